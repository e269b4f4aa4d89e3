"""Publishing: final named outputs from calibrated intermediates.

A group of one unaligned frame is published as a hard link of its intermediate (no copy; the
intermediate is only ever replaced, never changed in place, and a reused output is checked
against its recorded size and DATASUM, so a damaged link is made again); an
aligned single is resampled onto its sequence's reference grid; a group of several frames is
registered (with ``-a``) and combined in row strips, so memory stays within the budget.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from imgproc import __version__
from imgproc.align import (
    KERNELS,
    OPENCV_KERNELS,
    RESAMPLE_BAND_ROWS,
    BandResampler,
    MosaicRegistrar,
    Registrar,
    Shift,
    StarRegistrar,
    apply_shift,
    pier_side_flip,
    registration_stars,
)
from imgproc.cache import FileCache
from imgproc.colour import channel_shift, green, read_frame, write_cube
from imgproc.fitsio import (
    Float32Rows,
    ImageWriter,
    checksum_problem,
    link_atomic,
    read_image,
    set_card,
    write_atomic,
)
from imgproc.keywords import normalise
from imgproc.limits import SCRATCH_PREFIX, held_whole
from imgproc.manifest import OK, SKIPPED
from imgproc.plan import BEST
from imgproc.progress import Progress
from imgproc.provenance import provenance_cards, recognised_stamp
from imgproc.quality import FrameQuality, QualityRules, best_frame, frame_quality, quality_weights, rejections
from imgproc.report import cached_thumbnail
from imgproc.stack import MEMORY, ArraySource, combine
from imgproc.stages import problem_item
from imgproc.stamps import digest, read_json, write_json
from imgproc.stars import Stars
from imgproc.timecards import apply_time_cards, header_airmass, kept_history, mean_card_airmass
from imgproc.verify import file_record, size_problem
from imgproc.workers import release_freed_memory

log = logging.getLogger("imgproc")
_CAL = ("BIASCAL", "DARKCAL", "FLATCAL")
_FILES = ("BIASFILE", "DARKFILE", "FLATFILE")


#: Version of the cards a stack's header gets besides its frames' (in the stamp: stacks made
#: before the combine cards, or before ALIGNREF, are made again).
STACK_CARDS = "combine cards 2"


@dataclass(frozen=True)
class StackSettings:
    """How frames are registered and combined."""

    align: bool = False
    method: str = "sigclip"
    sigma_low: float = 3.0
    sigma_high: float = 3.0
    memory_budget: int = 2 * 1024**3
    upsample: int = 20
    min_significance: float = 15.0
    kernel: str = "lanczos4"
    registration: str = "stars"
    model: str = "similarity"
    reject_fwhm_ratio: float | None = 1.5
    reject_stars_ratio: float | None = 0.5
    reject_roundness_drop: float | None = 0.15
    normalize: str = "additive"
    reference: str = "first"
    weighting: str = "none"

    @property
    def rules(self) -> QualityRules:
        """The frame quality rules of aligned stacks."""
        return QualityRules(self.reject_fwhm_ratio, self.reject_stars_ratio, self.reject_roundness_drop)


@dataclass(frozen=True)
class Member:
    """One calibrated frame of a group: its intermediate file and plan facts."""

    frame_id: str
    path: Path  # the intermediate file
    source: str  # file name of the raw light
    mid: datetime
    pierside: str | None = None
    measure: Path | None = None  # the intermediate registration measures instead (a green frame)
    cfa: str | None = None  # a colour channel frame: the CFA pattern (as stored) of its light
    channel: str | None = None  # ... and its channel (R, G, B)


class ArrayRows:
    """Row ranges of a frame already in memory, read as :class:`~imgproc.fitsio.Float32Rows`
    reads them from an intermediate file."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape = data, data.shape

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (within the image)."""
        return self.data[start:stop]


class ShiftedSource:
    """Rows of a calibrated frame resampled onto the reference grid, strip by strip.

    ``frame`` gives the frame's rows: its intermediate file (:class:`~imgproc.fitsio.Float32Rows`,
    which reads only the rows a strip needs, plus a margin for interpolation) or its pixels
    already in memory (:class:`ArrayRows`). The part of a strip from outside the frame is NaN.
    """

    def __init__(self, frame: Float32Rows | ArrayRows, shift: Shift, kernel: str = "bilinear") -> None:
        self.shift, self.kernel = shift, kernel
        self._frame = frame
        turned = shift.linear is not None and kernel in OPENCV_KERNELS
        self._bands = BandResampler(frame.read, frame.shape, shift, kernel) if turned else None
        # unaligned, or the reference frame: the rows themselves, not resampled by nothing
        self._identity = shift.linear is None and not shift.flipped and shift.dy == shift.dx == 0

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of the frame."""
        return self._frame.shape

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the (possibly 180°-rotated) frame, NaN outside it."""
        ny, nx = self.shape
        block = np.empty((stop - start, nx), dtype=np.float32)
        lo, hi = min(max(start, 0), stop), max(min(stop, ny), start)
        block[: lo - start] = np.nan
        block[hi - start :] = np.nan
        if lo < hi:
            if self.shift.flipped:
                block[lo - start : hi - start] = self._frame.read(ny - hi, ny - lo)[::-1, ::-1]
            else:
                block[lo - start : hi - start] = self._frame.read(lo, hi)
        return block

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of the aligned frame as float32 (a turn, with an OpenCV kernel: from the
        fixed bands of a :class:`~imgproc.align.BandResampler`, whatever the strips)."""
        if self._bands is not None:
            return self._bands.rows(r0, r1)
        if self._identity and 0 <= r0 <= r1 <= self.shape[0]:
            return self._frame.read(r0, r1)  # an intermediate's rows as stored (big-endian)
        whole = math.floor(self.shift.dy)
        margin = 1 + KERNELS[self.kernel]
        window = self._rows(r0 - whole - margin, r1 - whole + margin)
        within = Shift(self.shift.dy - whole, self.shift.dx, False, 1.0)
        moved = apply_shift(window, within, kernel=self.kernel)
        return moved[margin : margin + (r1 - r0)]


#: Part of this process's stacking budget (:data:`imgproc.stack.MEMORY`) that the frames of an
#: aligned group may take to be kept in memory from registering to combining (with ``-S 20`` on
#: 2048² frames, 8 frames of 16 MB), instead of being read again from their intermediates (or,
#: resampled whole, from a scratch file), a strip at a time. The combine gets the rest of the
#: budget. With the default 2 GiB, 32 frames of 2048² are kept: a 40-frame stack of 2048² kept
#: whole (640 MiB, half the budget) took its process to 1.13 GiB, and was no faster (5.0 s
#: against 4.7 s spilled, bench/siril.py).
KEEP_FRAMES_SHARE = 0.25

#: Registrars of this process's publish jobs (threads of the workflow's process), built once
#: per reference intermediate and settings.
AnyRegistrar = Registrar | MosaicRegistrar | StarRegistrar
REGISTRARS: FileCache[AnyRegistrar] = FileCache(512 * 1024**2)


def registrar_for(reference: Path, settings: StackSettings) -> AnyRegistrar:
    """The registrar built on the reference frame's intermediate (see :data:`REGISTRARS`): a
    :class:`StarRegistrar` (``registration: stars``), else a :class:`Registrar`, or a
    :class:`MosaicRegistrar` for a colour sensor's frames (a CFA pattern in the header)."""

    def build() -> AnyRegistrar:
        rows = banded_rows(reference, settings.kernel)
        # a big frame mapped, not read: star matching needs only its stars, and only the
        # cross-correlation fallback (built if a frame needs it) reads its pixels
        data, header = (rows.memmap(), rows.header) if rows else read_frame(reference)
        data = green(data)
        mosaic = bool(normalise(header)["bayerpat"])  # colour sensors
        options = {"upsample": settings.upsample, "min_significance": settings.min_significance}
        if settings.registration == "stars":
            stars = saved_stars(reference)
            if rows and stars is None:  # found from the file a band at a time, not the map
                stars = registration_stars(rows)
            return StarRegistrar(data, model=settings.model, mosaic=mosaic, stars=stars, **options)
        return (MosaicRegistrar if mosaic else Registrar)(data, **options)

    key = (settings.upsample, settings.min_significance, settings.registration, settings.model)
    return REGISTRARS.get(key, str(reference), build)


def saved_stars(intermediate: Path) -> Stars | None:
    """The stars measured in an intermediate when it was calibrated (the ``stars`` of its record,
    :func:`imgproc.stages.measured`), or None."""
    record = (read_json(intermediate.with_suffix(".json")) or {}).get("stars")
    return Stars.from_record(record) if record else None


def measure(
    member: Member,
    data: np.ndarray,
    registrar: AnyRegistrar,
    reference_pierside: str | None,
    cells: int = 1,
    stars: Stars | None = None,
) -> tuple[Shift, FrameQuality]:
    """The shift that puts ``member`` (its pixels ``data``) on the reference grid, and the
    frame's quality (from the stars the star registrar matches, or found for it alone). ``stars``:
    the frame's stars measured when it was calibrated (:func:`saved_stars`), found here without.

    A frame whose PIERSIDE differs from the reference's is rotated by 180° (meridian flip)
    before measuring; when either pier side is unknown, the registrar also tries the rotation
    and keeps it if its peak is clearly stronger (star matching finds any rotation itself). A
    red or blue channel frame (its pixels ``cells`` CFA cells wide), measured on its light's green
    frame, gets its site's correction for the rotation (:func:`imgproc.colour.channel_shift`).
    """
    turned = pier_side_flip(reference_pierside, member.pierside)
    image = np.rot90(data, 2) if turned else data
    mosaic = isinstance(registrar, MosaicRegistrar) or (
        isinstance(registrar, StarRegistrar) and registrar.factor == 2
    )
    if stars is None or turned:  # the stars measured at calibration, unless the frame is turned
        stars = registration_stars(image, mosaic=mosaic)
    factor = 2 if mosaic else 1
    # the rotation is worth trying only when the pier sides do not say it is the same
    try_flip = not turned and not (bool(reference_pierside) and bool(member.pierside))
    if isinstance(registrar, StarRegistrar):
        shift = registrar.measure(image, try_flip=try_flip, stars=stars)
    else:
        shift = registrar.measure(image, try_flip=try_flip)
    if turned:
        shift = replace(shift, flipped=not shift.flipped)  # two 180° turns make none
    if member.cfa and member.channel in ("R", "B"):  # measured on green
        shift = channel_shift(shift, member.cfa, member.channel, cells)
    return shift, frame_quality(stars, factor=factor, transparency=shift.transparency)


def reference_sky(registrar: AnyRegistrar) -> float | None:
    """Sky level (ADU per pixel) of a star registrar's reference (None for the others)."""
    if not isinstance(registrar, StarRegistrar):
        return None
    return frame_quality(registrar.reference_stars, factor=registrar.factor).sky


def combine_cards(settings: StackSettings) -> list[tuple[str, str, str]]:
    """How a stack was combined: STACKMTH (method), STACKREJ (rejection) and STACKNRM
    (normalisation), as (keyword, value, comment)."""
    rejection = "none"
    if settings.method == "sigclip":
        rejection = f"sigma {settings.sigma_low:g} low {settings.sigma_high:g} high"
    return [
        ("STACKMTH", settings.method, "combine method (sigclip: mean after rejection)"),
        ("STACKREJ", rejection, "about the median, std, 1 pass"),
        ("STACKNRM", "none", "frames combined as calibrated, not scaled"),
    ]


def stack_header(
    headers: Sequence[fits.Header],
    members: Sequence[Member],
    shifts: Sequence[Shift | None],
    settings: StackSettings | None = None,
    qualities: Sequence[FrameQuality | None] | None = None,
    notes: Sequence[str] = (),
    weights: Sequence[float] | None = None,
) -> fits.Header:
    """Header of a stack: its first frame's, plus NCOMBINE, LIVETIME (summed exposure), how it
    was combined (:func:`combine_cards`), the UTC time cards of the frames and their mean
    AIRMASS (:func:`imgproc.timecards.apply_time_cards`), calibration flags true only if true
    for every frame, and HISTORY cards listing every input with its masters, applied shift and
    measured quality (and the camera's time cards the first frame replaced), and ``notes`` (the
    reference frame, the frames the quality rules left out). With the frames' ``weights`` in the
    combine (:func:`imgproc.quality.quality_weights`), STACKWGT says so and each input's HISTORY
    line has its weight."""
    out = headers[0].copy() if shifts[0] is None else aligned_header(headers[0], shifts[0])
    replaced = kept_history(out)
    out.remove("HISTORY", ignore_missing=True, remove_all=True)
    for line in replaced:
        out.add_history(line)
    out.set("NCOMBINE", len(headers), "number of frames combined")
    for key, value, comment in combine_cards(settings or StackSettings()):
        out.set(key, value, comment)
    if weights is not None:
        out.set("STACKWGT", "quality", "mean weighted (transp/(noise*FWHM))^2, mean 1")
    exptimes = [float(h.get("EXPTIME", 0) or 0) for h in headers]
    frames = [(m.mid - timedelta(seconds=e / 2.0), e) for m, e in zip(members, exptimes, strict=True)]
    computed = header_airmass(out, [m.mid for m in members])
    apply_time_cards(out, frames, computed, history=False)
    if computed is None and (cameras := mean_card_airmass(headers)) is not None:
        out.set("AIRMASS", round(cameras, 6), "mean of the frames' AIRMASS cards")
    out.set("LIVETIME", float(sum(exptimes)), "[s] summed exposure")
    for key in _CAL:
        out.set(key, all(bool(h.get(key, False)) for h in headers))
    for key in _ALIGN_CARDS:
        out.remove(key, ignore_missing=True)
    out.add_history(f"Calibrated and stacked by imgproc {__version__}")
    for key in _QUALITY_CARDS:
        out.remove(key, ignore_missing=True)
    for header, member, shift, quality, weight in zip(
        headers, members, shifts, qualities or [None] * len(members), weights or [None] * len(members),
        strict=True,
    ):  # fmt: skip
        masters = ",".join(str(header.get(key, "-")) for key in _FILES)
        moved = "" if shift is None else " " + _shift_text(shift)
        measured = "" if quality is None else " " + quality.text()
        weighted = "" if weight is None else f" weight={weight:.3f}"
        out.add_history(f"input {member.source} masters={masters}{moved}{measured}{weighted}")
    for line in notes:
        out.add_history(line)
    return out


#: Cards of an aligned single that describe its own registration (not a stack's).
_ALIGN_CARDS = (
    "ALIGNDX", "ALIGNDY", "ALIGNFLP", "ALIGNROT", "ALIGNSCL", "ALIGNMTH", "ALIGNNST", "ALIGNRMS", "ALIGNREF"
)  # fmt: skip


def _shift_text(shift: Shift) -> str:
    """One line of a stack's HISTORY: how a frame was registered."""
    text = f"dx={shift.dx:+.3f} dy={shift.dy:+.3f}{' flip' if shift.flipped else ''}"
    if shift.linear is not None:
        text += f" rot={shift.rotation:+.4f} scale={shift.scale:.6f}"
    if shift.method == "stars":
        return f"{text} by {shift.stars} stars rms={shift.residual:.3f}px"
    return f"{text} by correlation"


#: Characters of a comment beside a full-precision number (20 characters) on an 80-character card.
_WCS_COMMENT = 47

#: Cards of an aligned single's measured quality.
_QUALITY_CARDS = ("QFWHM", "QROUND", "QSTARS", "QSKY", "QNOISE", "QTRANSP")


def aligned_header(header: fits.Header, shift: Shift, quality: FrameQuality | None = None) -> fits.Header:
    """A single frame's header after resampling: ALIGN* cards, its measured quality (Q* cards),
    and its WCS moved with the pixels (CRPIX mapped as the pixels are; CD/PC multiplied by the
    inverse of the map's matrix: negated by a plain 180° flip)."""
    out = header.copy()
    ny, nx = int(out["NAXIS2"]), int(out["NAXIS1"])
    total = shift.total()[::-1, ::-1]  # (x, y) order, as the FITS axes 1, 2
    centre = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    if "CRPIX1" in out and "CRPIX2" in out:
        crpix = np.array([float(out["CRPIX1"]), float(out["CRPIX2"])]) - 1.0  # 0-based
        moved = total @ (crpix - centre) + centre + np.array([shift.dx, shift.dy])
        out["CRPIX1"], out["CRPIX2"] = (float(v) for v in moved + 1.0)
    if not np.array_equal(total, np.eye(2)):
        inverse = np.linalg.inv(total)
        for prefix, diagonal in (("CD", 0.0), ("PC", 1.0)):  # absent elements as the standard says
            keys = [(i, j, f"{prefix}{i + 1}_{j + 1}") for i in (0, 1) for j in (0, 1)]
            if not any(key in out for _, _, key in keys):
                continue
            matrix = np.zeros((2, 2))
            for i, j, key in keys:
                matrix[i, j] = float(out.get(key, diagonal if i == j else 0.0))
            matrix = matrix @ inverse
            for i, j, key in keys:
                if key in out or matrix[i, j] != 0.0:  # the camera's comment, cut to fit the card
                    out[key] = (
                        float(matrix[i, j]),
                        str(out.comments[key])[:_WCS_COMMENT] if key in out else "",
                    )
    out.set("ALIGNDX", round(shift.dx, 4), "[px] x shift applied onto the reference grid")
    out.set("ALIGNDY", round(shift.dy, 4), "[px] y shift applied onto the reference grid")
    out.set("ALIGNFLP", shift.flipped, "rotated 180 deg (meridian flip) before shifting")
    if shift.linear is not None:
        out.set("ALIGNROT", round(shift.rotation, 5), "[deg] rotation applied after the flip")
        out.set("ALIGNSCL", round(shift.scale, 7), "scale applied")
    out.set("ALIGNMTH", shift.method, "registered by: stars, correlation")
    if shift.method == "stars":
        out.set("ALIGNNST", shift.stars, "stars matched with the reference")
        out.set("ALIGNRMS", round(shift.residual, 4), "[px] RMS of the matched stars")
    if quality is not None:
        values = quality.record()
        comments = {"fwhm": "[px] median FWHM of the stars", "roundness": "median minor/major axis of stars",
                    "stars": "stars detected", "sky": "[adu] median sky level", "noise": "[adu] noise sigma",
                    "transparency": "star flux / reference's (matched stars)"}  # fmt: skip
        for key, (name, comment) in zip(_QUALITY_CARDS, comments.items(), strict=True):
            if values[name] is not None:
                out.set(key, values[name], comment)
    return out


def publish_single_aligned(
    member: Member,
    shift: Shift,
    target: Path,
    kernel: str,
    quality: FrameQuality | None = None,
    reference: str | None = None,
    cards: Sequence[tuple[str, str, str]] = (),
) -> None:
    """Resample one frame (each plane of an RGB cube alike) onto the reference grid (of the light
    named ``reference``) and write it to ``target``, with ``cards`` (keyword, value, comment)
    set in its header."""
    rows = banded_rows(member.path, kernel)
    data, header = (None, rows.header) if rows else read_frame(member.path)
    out = aligned_header(header, shift, quality)
    if reference:
        set_card(out, "ALIGNREF", reference, "reference frame (raw light)")
    for key, value, comment in cards:
        set_card(out, key, value, comment)
    if rows is None:
        write_output(target, resampled(data, shift, kernel), out)
        return
    bands = BandResampler(rows.read, rows.shape, shift, kernel)
    with ImageWriter(target, out, rows.shape) as writer:
        for start in range(0, rows.shape[0], RESAMPLE_BAND_ROWS):
            writer.write(bands.rows(start, min(rows.shape[0], start + RESAMPLE_BAND_ROWS)))


def banded_rows(path: Path, kernel: str) -> Float32Rows | None:
    """The rows of an aligned frame's intermediate when it is resampled a band of rows at a
    time (:class:`~imgproc.align.BandResampler`) rather than whole, else None: a mono frame
    over :data:`~imgproc.limits.WHOLE_FRAME_MAX_BYTES` of float32 (a 61-megapixel one),
    with an OpenCV kernel. Its registration reads its stars, not its pixels."""
    if kernel not in OPENCV_KERNELS or path.suffix != ".fits":
        return None
    try:
        rows = Float32Rows(path)
    except (OSError, ValueError):
        return None  # a cube (RGB) or not a plain float32 frame
    return None if held_whole(rows.shape) else rows


def resampled(data: np.ndarray, shift: Shift, kernel: str) -> np.ndarray:
    """A frame, or each plane of an RGB cube alike, resampled by ``shift`` (:func:`apply_shift`)."""
    if data.ndim == 3:
        return np.stack([apply_shift(plane, shift, kernel=kernel) for plane in data])
    return apply_shift(data, shift, kernel=kernel)


def write_output(target: Path, data: np.ndarray, header: fits.Header) -> None:
    """Write a frame, or an RGB cube, to ``target`` atomically."""
    if data.ndim == 3:
        write_cube(target, data, header)
    else:
        write_atomic(target, data, header)


def whole_frames(settings: StackSettings) -> bool:
    """True when an aligned stack's frames are resampled whole, once registered, rather than a
    strip at a time while combining: star matching gives rotations, which read rows from all
    over the frame, and a cubic spline's prefilter reaches the whole frame (strips of the
    prefiltered frame would depend on the strip height, and so on the budget and threads)."""
    return settings.align and (settings.registration == "stars" or settings.kernel != "bilinear")


def _spill(data: np.ndarray, path: Path) -> list[Float32Rows]:
    """A resampled frame (or RGB cube) that is not kept in memory, written to ``path`` as native
    float32, and each plane's rows read back from it: the combine reads a strip at a time,
    whose pages stay in the page cache, not in this process (mapped, all of them stayed)."""
    np.ascontiguousarray(data, np.float32).tofile(path)
    planes = len(data) if data.ndim == 3 else 1
    return [Float32Rows.raw(path, data.shape[-2:], plane) for plane in range(planes)]


def _planes(data: np.ndarray) -> list[ArrayRows]:
    """The rows of a frame held in memory, or of each plane of an RGB cube."""
    return [ArrayRows(plane) for plane in (data if data.ndim == 3 else [data])]


def publish_stack(
    members: Sequence[Member],
    shifts: Sequence[Shift | None],
    target: Path,
    settings: StackSettings,
    threads: int = 1,
    frames: Sequence[tuple[Sequence[Float32Rows | ArrayRows], fits.Header]] | None = None,
    cards: Sequence[tuple[str, str, str]] = (),
    resampled: bool = False,
    qualities: Sequence[FrameQuality | None] | None = None,
    notes: Sequence[str] = (),
    sky: float | None = None,
) -> tuple[np.ndarray | None, fits.Header]:
    """Combine ``members`` (each resampled by its shift, if any) into ``target``, with ``cards``
    (keyword, value, comment) set in its header; returns the stack (None for a mono frame too
    big to hold whole, written as its strips are combined) and its header.

    ``frames`` are the rows of the members' planes (in memory, or spilled to a scratch file)
    and their headers when the caller made them (it read the frames to register them): the
    combine then gets :data:`KEEP_FRAMES_SHARE` less of the budget. Without them each member is
    read from its intermediate, a strip at a time.  ``resampled``: the ``frames`` are already
    on the reference grid (``shifts`` only go into the header).
    ``qualities`` and ``notes`` go into its HISTORY (:func:`stack_header`).  With
    ``settings.normalize == 'additive'``, a ``sky`` level and every frame's quality, each frame
    is offset so that its sky (``FrameQuality.sky``) is ``sky`` before the rejection: a sky
    that brightens through the night is not taken for outliers. With ``settings.weighting ==
    'quality'`` and every frame's quality, the mean after rejection is weighted by
    :func:`imgproc.quality.quality_weights` (not the median).
    """
    # an RGB cube is combined plane by plane, each plane moved by its frame's shift
    layers: list[list[Float32Rows | ArrayRows]]
    if frames is None:
        cube = members[0].channel == "RGB"
        layers = [
            [Float32Rows(m.path, plane if cube else None) for m in members]
            for plane in range(3 if cube else 1)
        ]
        headers = [rows.header for rows in layers[0]]  # type: ignore[union-attr]
        budget = settings.memory_budget
    else:
        layers = [list(layer) for layer in zip(*(planes for planes, _ in frames), strict=True)]
        cube = len(layers) == 3
        headers = [header for _, header in frames]
        budget = int(settings.memory_budget * (1 - KEEP_FRAMES_SHARE))
    no_shift = Shift(0.0, 0.0, False, 1.0)
    offsets = None  # an RGB cube's sky is measured on green only: its planes are not offset
    measured = bool(qualities) and None not in qualities  # type: ignore[operator]
    if settings.normalize == "additive" and sky is not None and measured and not cube:
        offsets = [sky - q.sky for q in qualities]  # type: ignore[union-attr]
    weights = None
    if settings.weighting == "quality" and measured and settings.method != "median":
        weights = quality_weights(qualities)  # type: ignore[arg-type]
    header = stack_header(headers, members, shifts, settings, qualities, notes, weights)
    if offsets is not None:
        header.add_history(f"sky of every frame offset to {sky:.3f} (additive normalisation)")
    for key, value, comment in cards:
        set_card(header, key, value, comment)

    def combined(
        layer: list[Float32Rows | ArrayRows], sink: Callable[[np.ndarray], None] | None = None
    ) -> np.ndarray | None:
        sources = [
            ArraySource(r.data)
            if resampled and isinstance(r, ArrayRows)
            else ShiftedSource(r, no_shift if resampled else s or no_shift, settings.kernel)
            for r, s in zip(layer, shifts, strict=True)
        ]
        return combine(
            sources,
            method=settings.method,
            sigma_low=settings.sigma_low,
            sigma_high=settings.sigma_high,
            memory_budget=budget,
            threads=threads,
            offsets=offsets,
            weights=weights,
            sink=sink,
        )

    shape = layers[0][0].shape
    if not cube and not held_whole(shape):  # a 61-MP stack is written as its strips are made
        with ImageWriter(target, header, shape) as writer:
            combined(layers[0], writer.write)
        return None, header
    planes = [combined(layer) for layer in layers]
    data = np.stack(planes) if cube else planes[0]
    write_output(target, data, header)
    return data, header


def _shift_record(shift: Shift) -> dict[str, Any]:
    record = {"dy": round(shift.dy, 4), "dx": round(shift.dx, 4), "flipped": shift.flipped,
              "quality": round(shift.quality, 4), "method": shift.method}  # fmt: skip
    if shift.method == "stars":
        record |= {"rotation": round(shift.rotation, 5), "scale": round(shift.scale, 7), "stars": shift.stars,
                   "residual": round(shift.residual, 4)}  # fmt: skip
    else:
        record["significance"] = round(shift.significance, 1)
    return record


def check_shift(shift: Shift, registrar: AnyRegistrar) -> str:
    """Why a measured shift cannot be used ('' when it can)."""
    if registrar.accepts(shift):
        return ""
    return (
        f"alignment failed: correlation peak {shift.significance:.1f} sigma above the surface, "
        f"below {registrar.min_significance:g}"
    )


def plan_members(entries: Sequence[Mapping[str, Any]], workdir: Path) -> list[Member]:
    """Members of a group from its plan rows."""
    return [
        Member(
            frame_id=str(e["frame_id"]),
            path=workdir / "cal" / f"{e['frame_id']}.fits",
            source=Path(str(e["path"])).name,
            mid=datetime.fromisoformat(str(e["mid"])),
            pierside=e.get("pierside"),  # type: ignore[arg-type]
            measure=workdir / "cal" / f"{e['measure']}.fits"
            if e.get("measure") not in (None, "", e["frame_id"])
            else None,
            cfa=e.get("cfa") or None,  # type: ignore[arg-type]
            channel=e.get("channel") or None,  # type: ignore[arg-type]
        )
        for e in entries
    ]


def publish_group(
    name: str,
    entries: Sequence[Mapping[str, Any]],
    reference: Mapping[str, Any] | None,
    workdir: Path,
    outdir: Path,
    settings: StackSettings,
    threads: int = 1,
) -> dict[str, Any]:
    """Make one final output from its group's intermediates; returns its receipt item.

    With ``threads`` > 1 the frames are registered, and the stack combined, on that many
    threads at once.

    An existing output is replaced only when it was made by imgproc from the same lights (its
    stamp file in ``work/pub`` says so, or without one its own header,
    :func:`imgproc.provenance.recognised_stamp`); anything else at that name is left untouched
    and reported. One recognised by its header whose stamp is current is kept as it is.
    """
    members = plan_members(entries, workdir)
    stamps = {m.frame_id: (read_json(m.path.with_suffix(".json")) or {}).get("stamp") for m in members}
    excluded = {
        m.frame_id: "not calibrated" for m in members if not stamps[m.frame_id] or not m.path.exists()
    }
    members = [m for m in members if m.frame_id not in excluded]
    sources = sorted(str(e["path"]) for e in entries)
    target, stamp_path = outdir / name, workdir / "pub" / f"{name}.json"
    previous = read_json(stamp_path)
    recognised = recognised_stamp(target, sources) if previous is None and target.exists() else None
    if recognised is not None:
        previous = {"sources": sources, "stamp": None}
    if target.exists() and (previous is None or previous.get("sources") != sources):
        return {
            "status": SKIPPED,
            "excluded": excluded,
            "reason": f"{target} exists and was not made by imgproc from these lights; not overwritten",
        }
    if not members:
        return {"status": SKIPPED, "reason": "no calibrated frame", "excluded": excluded}
    ref_stamp = None
    if settings.align and reference is not None:
        ref_stamp = (read_json(workdir / "cal" / f"{reference['frame_id']}.json") or {}).get("stamp")
    # the memory budget does not change the bytes; weighting none is left out so that the stamps
    # (IMGSTAMP) of stacks are those of the versions before weighting
    how = {key: value for key, value in asdict(settings).items() if key != "memory_budget"}
    if settings.weighting == "none":
        del how["weighting"]
    stamp = digest([name, [stamps[m.frame_id] for m in members], ref_stamp, how, __version__, STACK_CARDS])
    if target.exists() and previous.get("stamp") == stamp:
        problem = size_problem(target, previous) or checksum_problem(target)
        if not problem:
            kept = ("ncombine", "excluded", "shifts", "size")
            optional = ("quality", "reference")
            reused = {key: previous.get(key) for key in kept} | {
                k: previous[k] for k in optional if k in previous
            }
            return reused | {"status": "reused"}
        log.warning("%s: made again", problem)
    linked = len(members) == 1 and not settings.align  # the output is the intermediate: its stamp
    if recognised is not None and recognised == (stamps[members[0].frame_id] if linked else stamp):
        ncombine = int(fits.getheader(target).get("NCOMBINE", 1))
        item = {"status": "reused", "ncombine": ncombine, "excluded": excluded, "shifts": {}}
        item |= file_record(target)
        write_json(stamp_path, {"sources": sources, "stamp": stamp, **item})
        return item
    write_json(stamp_path, {"sources": sources, "stamp": None})
    shifts: list[Shift | None] = [None] * len(members)
    qualities: list[FrameQuality | None] = [None] * len(members)
    measured_quality: dict[str, FrameQuality] = {}
    notes: list[str] = []
    sky: float | None = None  # the reference's, which aligned stacks are normalised to
    frames: list[tuple[list[Float32Rows] | list[ArrayRows], fits.Header]] | None = None
    resample = False
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=stamp_path.parent) as scratch:
        if settings.align and entries[0].get("pub_kind") != "link":  # a mosaic is never resampled
            if reference is None or not (workdir / "cal" / f"{reference['frame_id']}.fits").exists():
                return {
                    "status": SKIPPED,
                    "reason": "the sequence's reference frame was not calibrated",
                    "excluded": excluded,
                }
            registrar = registrar_for(workdir / "cal" / f"{reference['frame_id']}.fits", settings)
            sky = reference_sky(registrar)
            notes.append(f"registered to {Path(str(reference['path'])).name} ({settings.reference} frame)")
            pierside = reference.get("pierside")
            planes = 3 if entries[0].get("channel") == "RGB" else 1
            group_bytes = len(members) * planes * registrar.shape[0] * registrar.shape[1] * 4
            budget = MEMORY.budget(settings.memory_budget) * KEEP_FRAMES_SHARE
            # big frames are registered by their stars and resampled by bands as they are combined
            banded = planes == 1 and banded_rows(members[0].path, settings.kernel) is not None
            keep = len(members) > 1 and group_bytes <= budget and not banded
            resample = len(members) > 1 and whole_frames(settings) and not banded

            # a thread's frame, its measured (green) frame and its resampled copy: registrations
            # wait for room in the stacking budget, as strips of the combine do
            working = 3 * planes * registrar.shape[0] * registrar.shape[1] * 4

            def register(
                member: Member,
            ) -> tuple[Shift, FrameQuality, tuple[list[Float32Rows] | list[ArrayRows], fits.Header] | None]:
                with MEMORY.reserve(0 if banded else working, settings.memory_budget):
                    rows = Float32Rows(member.path) if banded else None
                    # a big frame mapped, not read: star matching reads only its stars
                    data, header = (rows.memmap(), rows.header) if rows else read_frame(member.path)
                    probe = green(data) if member.measure is None else read_image(member.measure)[0]
                    cells, stars = int(header.get("CFACELLS", 1)), saved_stars(member.measure or member.path)
                    if rows and stars is None:  # found from the file a band at a time, not the map
                        stars = registration_stars(rows)
                    shift, quality = measure(member, probe, registrar, pierside, cells, stars)
                    if resample and not check_shift(shift, registrar):  # see whole_frames
                        data = resampled(data, shift, settings.kernel)
                        spilled = None if keep else _spill(data, Path(scratch) / f"{member.frame_id}.f32")
                        return shift, quality, (spilled or _planes(data), header)
                    return shift, quality, (_planes(data), header) if keep else None

            with ThreadPoolExecutor(threads) as pool:
                measured = list(pool.map(register, members))
            for member, (shift, quality, _) in zip(members, measured, strict=True):
                measured_quality[member.frame_id] = quality
                problem = check_shift(shift, registrar)
                if problem:
                    excluded[member.frame_id] = problem
            aligned = [
                (m, r[1]) for m, r in zip(members, measured, strict=True) if m.frame_id not in excluded
            ]
            for index, reason in rejections([q for _, q in aligned], settings.rules).items():
                member = aligned[index][0]
                excluded[member.frame_id] = reason
                notes.append(f"rejected {member.source}: {reason.removeprefix('rejected by quality: ')}")
            kept = [(m, *r) for m, r in zip(members, measured, strict=True) if m.frame_id not in excluded]
            del measured
            if not kept:
                return {"status": SKIPPED, "reason": "no frame could be aligned", "excluded": excluded}
            members, shifts = [m for m, _, _, _ in kept], [s for _, s, _, _ in kept]
            qualities = [q for _, _, q, _ in kept]
            if sky is None:  # registered by cross-correlation: the group's median sky
                sky = float(np.median([q.sky for q in qualities if q is not None]))
            frames = [f for _, _, _, f in kept] if kept[0][3] is not None else None  # type: ignore[misc]
            del kept
            if banded:  # what finding big frames' stars took goes back before they are combined
                release_freed_memory()
        single_shift = shifts[0]
        cards = provenance_cards(stamp, sources)
        made: tuple[np.ndarray | None, fits.Header | None] = (None, None)
        if len(members) > 1:
            if settings.align and reference is not None and any(s is not None for s in shifts):
                cards.append(("ALIGNREF", Path(str(reference["path"])).name, "reference frame (raw light)"))
            made = publish_stack(
                members, shifts, target, settings, threads, frames, cards, resample, qualities, notes, sky
            )
        elif single_shift is None:
            link_atomic(members[0].path, target)
        else:
            publish_single_aligned(
                members[0],
                single_shift,
                target,
                settings.kernel,
                qualities[0],
                Path(str(reference["path"])).name,
                cards,
            )
    if any(entry.get("thumb") for entry in entries):  # here, in parallel jobs, not in the report
        cached_thumbnail(target, workdir / "thumbs", data=made[0], header=made[1])
    records = {m.frame_id: _shift_record(s) for m, s in zip(members, shifts, strict=True) if s is not None}
    quality = {fid: q.record() for fid, q in measured_quality.items()}
    item = {"status": "written", "ncombine": len(members), "excluded": excluded, "shifts": records}
    if quality:
        item["quality"] = quality
    if settings.align and reference is not None:
        item["reference"] = str(reference["frame_id"])
    item |= file_record(target)
    write_json(stamp_path, {"sources": sources, "stamp": stamp, **item})
    return item


def choose_reference(
    entry: Mapping[str, Any],
    references: Mapping[str, Mapping[str, Any]],
    workdir: Path,
    settings: StackSettings,
) -> Mapping[str, Any] | None:
    """The plan row of the frame ``entry`` (a plan row) is aligned to: the plan's reference, or
    with ``settings.reference`` :data:`~imgproc.plan.BEST` (the plan says so), the best light of
    its sequence by the quality measured at calibration (:func:`imgproc.quality.best_frame`; the
    first light when none is measured). Every publish job of the sequence reads the same
    measurements, so they all choose the same frame. A colour channel frame's light is judged,
    and registered, by its green frame (``measure``): the channel sequences of a night choose
    the same light."""
    planned = str(entry.get("reference") or "")
    if settings.reference != BEST or not planned:
        return references.get(planned)
    lights = sorted(
        (
            row
            for row in references.values()
            if row.get("reference") and row["status"] == OK and row["sequence"] == entry["sequence"]
        ),
        key=lambda row: (str(row["mid"]), str(row["path"])),
    )
    if not lights:
        return None
    qualities = {}
    for row in lights:
        measured = str(row.get("measure") or row["frame_id"])
        record = (read_json(workdir / "cal" / f"{measured}.json") or {}).get("quality")
        if record and (workdir / "cal" / f"{measured}.fits").exists():
            qualities[str(row["frame_id"])] = FrameQuality.from_record(record)
    best = best_frame(qualities, settings.rules)
    chosen = next((row for row in lights if row["frame_id"] == best), lights[0])
    return references.get(str(chosen.get("measure") or chosen["frame_id"]))


def run_publish_batch(
    entries: Sequence[Mapping[str, Any]],
    references: Mapping[str, Mapping[str, Any]],
    workdir: Path,
    outdir: Path,
    receipt: Path,
    settings: StackSettings,
    threads: int = 1,
) -> dict[str, dict]:
    """Make the final outputs of one publish batch and write the batch receipt.

    ``references`` maps a reference frame id to its plan row (used with alignment); each
    group is made on ``threads`` threads.
    """
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for entry in entries:
        groups[str(entry["output"])].append(entry)
    results: dict[str, dict] = {}
    # every group of a sequence has the same reference: chosen once, not once per output (the
    # best frame reads every light's calibration record)
    chosen: dict[tuple[str, str], Mapping[str, Any] | None] = {}
    progress = Progress(f"publish {receipt.stem}", len(groups))
    for done, (name, group) in enumerate(sorted(groups.items()), start=1):
        key = (str(group[0].get("sequence")), str(group[0].get("reference") or ""))
        if key not in chosen:
            chosen[key] = choose_reference(group[0], references, workdir, settings)
        reference = chosen[key]
        try:
            results[name] = publish_group(name, group, reference, workdir, outdir, settings, threads)
        except Exception as exc:  # one output's error, whatever it is, must not stop the batch
            inputs = [workdir / "cal" / f"{e['frame_id']}.fits" for e in group]
            results[name] = problem_item(exc, name, "publishing failed", inputs) | {"excluded": {}}
        if not held_whole((group[0]["ny"], group[0]["nx"])):  # a 61-MP frame's freed memory goes back
            release_freed_memory()
        progress.step(done)
    write_json(receipt, {"kind": "publish", "items": results, "seconds": progress.elapsed()})
    return results
