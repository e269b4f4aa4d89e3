"""Calibration: (light − bias − k·dark) / normalised flat, in float32, with provenance cards.

Convention: master darks are bias-subtracted (dark current only) when a bias folder is given,
as the original tool's companion scripts make them; without a bias the dark carries the bias.
A dark of another exposure is scaled by k = light / dark exposure (only with a bias, see
:func:`imgproc.matching.match_dark`); k is 1 for a dark of the light's exposure.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from astropy.io import fits

from imgproc import __version__
from imgproc.binning import bin_header, bin_image, binned_shape
from imgproc.cache import FileCache
from imgproc.fitsio import FitsError, ImageWriter, read_image, read_image_blocks
from imgproc.timecards import apply_time_cards, header_airmass

ROLES = ("bias", "dark", "flat")
_CAL_CARDS = {"bias": "BIASCAL", "dark": "DARKCAL", "flat": "FLATCAL"}
_FILE_CARDS = {"bias": "BIASFILE", "dark": "DARKFILE", "flat": "FLATFILE"}
#: Cards dropped from the light's header: scaling and checksums no longer describe the data.
_DROP = ("BZERO", "BSCALE", "BLANK", "CHECKSUM", "DATASUM")
#: Cards the FITS standard requires to be numbers; a camera's non-number (PANOPTES writes
#: ``EQUINOX = ''``) is removed, so the output passes fitsverify, and kept in HISTORY.
_NUMBERS = ("EQUINOX", "EPOCH")


def normalise_flat(flat: np.ndarray) -> np.ndarray:
    """A flat divided by its mean over usable pixels; pixels ≤ 0 or non-finite become NaN.

    Dividing by NaN gives NaN, never inf, so dead flat pixels show as NaN in the light.
    """
    usable = np.isfinite(flat) & (flat > 0)
    if not usable.any():
        raise ValueError("flat has no positive finite pixel")
    out = np.where(usable, flat, np.nan).astype(np.float32)
    mean = float(np.mean(out[usable], dtype=np.float64))
    if abs(mean - 1.0) > 1e-6:
        out /= np.float32(mean)
    return out


def calibrate_image(
    light: np.ndarray,
    bias: np.ndarray | None = None,
    dark: np.ndarray | None = None,
    flat: np.ndarray | None = None,
    *,
    dark_scale: float | None = None,
    in_place: bool = False,
) -> np.ndarray:
    """(light − bias − k·dark) / flat as a new float32 array, k = ``dark_scale`` (None: 1); the
    inputs are not modified, except a float32 ``light`` with ``in_place``, which is calibrated
    in place and returned.

    ``flat`` must already be normalised (:func:`normalise_flat`).  Shapes must agree.  Infinite
    input pixels come out as NaN, like every other pixel without a valid value.
    """
    out = np.array(light, dtype=np.float32, copy=not (in_place and light.dtype == np.float32))
    check_master_shapes(out.shape, {"bias": bias, "dark": dark, "flat": flat})
    if bias is not None:
        np.subtract(out, bias, out=out)
    if dark is not None:
        np.subtract(out, dark if dark_scale is None else np.float32(dark_scale) * dark, out=out)
    if flat is not None:
        np.divide(out, flat, out=out)
    infinite = np.isinf(out)
    if infinite.any():  # inf pixels are bad pixels: NaN
        out[infinite] = np.nan
    return out


def check_master_shapes(shape: tuple[int, ...], masters: Mapping[str, np.ndarray | None]) -> None:
    """FitsError naming the first master (by role) whose shape is not the light's ``shape``."""
    for role, master in masters.items():
        if master is not None and master.shape != shape:
            raise FitsError(f"{role} shape {master.shape} differs from the light's {shape}")


class MasterCache:
    """Master frames, read once per process (flats normalised once) and shared read-only.

    Keyed by role, path, size and modification time, so a replaced master is read again. The
    workflow's batch jobs run as threads of one process and share :data:`MASTERS`; it holds at
    most ``max_bytes`` of pixels, dropping the least recently used master first.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self._files: FileCache[np.ndarray] = FileCache(max_bytes)

    def get(self, role: str, path: str) -> np.ndarray:
        """The master of ``role`` at ``path`` as read-only float32 (flats normalised)."""
        return self._files.get(role, path, lambda: _read_master(role, path))


def _read_master(role: str, path: str) -> np.ndarray:
    try:
        data, _ = read_image(Path(path))
        frame = normalise_flat(data) if role == "flat" else data
    except ValueError as exc:  # FitsError, or a flat without a usable pixel: the master is unusable
        raise FitsError(f"master {Path(path).name}: {exc}") from exc
    frame.flags.writeable = False
    return frame


MASTERS = MasterCache()


def calibrated_header(
    header: fits.Header,
    masters: Mapping[str, str | None],
    *,
    observer: str,
    mid: datetime,
    exptime: float,
    binning: int,
    dark_scale: float | None = None,
) -> fits.Header:
    """The light's header with calibration flags, master file names, OBSERVER, binning and a
    HISTORY line; scaling and checksum cards removed, and EQUINOX or EPOCH if not a number; the
    UTC time cards of mid-exposure ``mid`` and exposure ``exptime`` (s, as the plan read it) and
    AIRMASS (:func:`imgproc.timecards.apply_time_cards`). A scaled dark gets DARKSCAL and a HISTORY
    line naming the dark and the ratio."""
    out = bin_header(header, binning)
    for key in _DROP:
        out.remove(key, ignore_missing=True, remove_all=True)
    for key in _NUMBERS:
        value = out.get(key)
        if key in out and (isinstance(value, bool) or not isinstance(value, int | float)):
            out.add_history(f"imgproc removed {key} = {value!r}: not a number")
            out.remove(key, remove_all=True)
    for role in ROLES:
        path = masters.get(role)
        out.set(
            _CAL_CARDS[role], path is not None, f"{role} subtracted" if role != "flat" else "flat-fielded"
        )
        if path is not None:
            out.set(_FILE_CARDS[role], Path(path).name, f"master {role} used")
    out.set("OBSERVER", observer, "observer code")
    apply_time_cards(out, [(mid - timedelta(seconds=exptime / 2.0), exptime)], header_airmass(header, [mid]))
    out.add_history(f"Calibrated by imgproc {__version__}")
    if masters.get("dark") is not None and dark_scale is not None:
        out.set("DARKSCAL", float(dark_scale), "dark scaled by the exposure ratio light/dark")
        out.add_history(f"dark {Path(masters['dark']).name} scaled by {dark_scale:.6g} (exposure ratio)")
    return out


def calibrate_frame(
    light_path: Path,
    hdu: int,
    masters: Mapping[str, str | None],
    cache: MasterCache,
    target: Path,
    *,
    observer: str,
    mid: datetime,
    exptime: float,
    binning: int,
    dark_scale: float | None = None,
) -> tuple[np.ndarray, fits.Header]:
    """Read, calibrate and bin one light into the float32 FITS file ``target``; returns its
    pixels and header. ``dark_scale`` multiplies the dark (one of another exposure).

    The frame streams through in blocks of rows (a multiple of ``binning``) that stay in the
    CPU cache from the read through calibration and binning to the write, instead of a
    dozen passes over the whole frame. The pixels are the same as :func:`calibrate_image`
    and :func:`bin_image` of the whole frame give.
    """
    header, image, blocks = read_image_blocks(light_path, hdu, multiple=binning)
    frames = {role: cache.get(role, path) for role, path in masters.items() if path is not None}
    check_master_shapes(image.shape, frames)  # whole frames: each block's slices would agree
    out_header = calibrated_header(
        header, masters, observer=observer, mid=mid, exptime=exptime, binning=binning, dark_scale=dark_scale
    )
    binned = image if binning == 1 else np.empty(binned_shape(image.shape, binning), np.float32)
    with ImageWriter(target, out_header, binned.shape) as out:
        for rows in blocks:
            masters_rows = [frames[role][rows] if role in frames else None for role in ROLES]
            part = calibrate_image(image[rows], *masters_rows, dark_scale=dark_scale, in_place=True)
            if binning > 1:
                if len(part) < binning:  # the remainder rows binning drops
                    continue
                part = bin_image(part, binning)
                first = rows.start // binning
                binned[first : first + len(part)] = part
            out.write(part)
    return binned, out_header
