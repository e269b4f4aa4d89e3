"""Building master frames: raw calibration frames corrected and combined in row strips.

What to build (groups, corrections) is planned by :mod:`imgproc.masters`; this module combines
each group by a sigma-clipped mean (3σ, median centre, MAD width) under the memory budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from imgproc import __version__
from imgproc.fitsio import read_header, read_image
from imgproc.masters import IMAGETYP
from imgproc.stack import ArraySource, FitsSource, FrameSource, combine


class CorrectedSource:
    """Rows of a raw calibration frame with bias and (scaled) dark subtracted, times ``gain``."""

    def __init__(
        self,
        source: FrameSource,
        bias: np.ndarray | None = None,
        dark: np.ndarray | None = None,
        gain: float = 1.0,
    ) -> None:
        self.source, self.bias, self.dark, self.gain = source, bias, dark, gain

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of the frame."""
        return self.source.shape

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) corrected, as float32."""
        rows = self.source.read_rows(r0, r1)
        if self.bias is not None:
            rows -= self.bias[r0:r1]
        if self.dark is not None:
            rows -= self.dark[r0:r1]
        if self.gain != 1.0:
            rows *= self.gain
        return rows


def central_mean(source: FrameSource) -> float:
    """Mean of the finite pixels of the central half (in each axis) of a frame."""
    ny, nx = source.shape
    block = source.read_rows(ny // 4, max(ny // 4 + 1, 3 * ny // 4))[
        :, nx // 4 : max(nx // 4 + 1, 3 * nx // 4)
    ]
    value = float(np.nanmean(block, dtype=np.float64))
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"central region has no positive signal (mean {value})")
    return value


def build_master(master: Mapping[str, Any], memory_budget: int) -> tuple[np.ndarray, fits.Header]:
    """Combine a planned master's raw frames; returns float32 pixels and its header."""
    role, paths = master["role"], master["members"].split(";")
    bias = read_image(Path(master["bias"]))[0] if master.get("bias") else None
    dark = read_image(Path(master["dark"]))[0] if master.get("dark") else None
    scale = master.get("dark_scale")
    if dark is not None and scale is not None:
        dark *= np.float32(scale)
    sources = [CorrectedSource(FitsSource(p, read_header(Path(p))[1]), bias, dark) for p in paths]
    if role == "flat":  # frames of different brightness: each scaled to a common level first
        for source in sources:
            source.gain = 1.0 / central_mean(source)
    data = combine(sources, method="sigclip", sigma_low=3.0, sigma_high=3.0, memory_budget=memory_budget,
                   width="mad")  # fmt: skip
    if role == "flat":
        data /= np.float32(central_mean(ArraySource(data)))
    header = read_header(Path(paths[0]))[0]
    for key in ("BZERO", "BSCALE", "BLANK", "CHECKSUM", "DATASUM"):
        header.remove(key, ignore_missing=True, remove_all=True)
    header["IMAGETYP"] = (IMAGETYP[role], "master frame built by imgproc")
    header["DATE-OBS"] = (master["date_obs"], "[UTC] mean DATE-OBS of the combined frames")
    header["NCOMBINE"] = (len(paths), "number of raw frames combined")
    for key, value in (("BIASFILE", master.get("bias")), ("DARKFILE", master.get("dark"))):
        if value:
            header[key] = (Path(value).name, "master subtracted from every frame")
    if dark is not None and scale is not None:
        header["DARKSCAL"] = (float(scale), "dark scaled by the exposure ratio frame/dark")
        header.add_history(f"dark {Path(master['dark']).name} scaled by {float(scale):.6g} (exposure ratio)")
    header.add_history(f"imgproc {__version__}: sigma-clipped mean (3 sigma, median centre, MAD width)")
    if role == "flat":
        header.add_history("each frame scaled to its central mean; master normalised to central mean 1")
    for path in paths:
        header.add_history(f"input {Path(path).name}")
    return data, header
