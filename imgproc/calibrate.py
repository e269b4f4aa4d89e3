"""Calibration: (light − bias − k·dark) / normalised flat, in float32, with provenance cards.

Convention: master darks are bias-subtracted (dark current only) when a bias folder is given,
as the original tool's companion scripts make them; without a bias the dark carries the bias.
A dark of another exposure is scaled by k = light / dark exposure (only with a bias, see
:func:`imgproc.matching.match_dark`); k is 1 for a dark of the light's exposure.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from astropy.io import fits

from imgproc import __version__, limits
from imgproc.binning import bin_header, bin_image, binned_shape
from imgproc.cache import FileCache
from imgproc.colour import colour_image, normalise_colour_flat, write_cube
from imgproc.fitsio import (
    BLOCK_BYTES,
    FitsError,
    Float32Rows,
    ImageWriter,
    PlainRows,
    image_blocks,
    locked,
    read_image,
    replaced_atomically,
    set_card,
    write_atomic,
)
from imgproc.limits import held_whole
from imgproc.timecards import apply_time_cards, header_airmass

ROLES = ("bias", "dark", "flat")
_CAL_CARDS = {"bias": "BIASCAL", "dark": "DARKCAL", "flat": "FLATCAL"}
_FILE_CARDS = {"bias": "BIASFILE", "dark": "DARKFILE", "flat": "FLATFILE"}
#: Version of the cards an intermediate's header gets besides the camera's (ORIGOBS, an OBJECT
#: from --object), in its stamp: intermediates made before them are made again.
HEADER_CARDS = "header cards 1"
#: Cards dropped from the light's header: scaling and checksums no longer describe the data.
_DROP = ("BZERO", "BSCALE", "BLANK", "CHECKSUM", "DATASUM")
#: Cards the FITS standard requires to be numbers; a camera's non-number (PANOPTES writes
#: ``EQUINOX = ''``) is removed, so the output passes fitsverify, and kept in HISTORY.
_NUMBERS = ("EQUINOX", "EPOCH")


def _usable(flat: np.ndarray) -> np.ndarray:
    return (flat > 0) & (flat < np.inf)  # positive and finite: NaN fails both


def _usable_flat(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The flat as float32 with its unusable pixels NaN, and the mask of the usable ones."""
    usable = _usable(flat)
    out = flat.astype(np.float32)
    np.copyto(out, np.float32(np.nan), where=~usable)
    return out, usable


def _scaled(flat: np.ndarray, mean: float) -> np.ndarray:
    if abs(mean - 1.0) > 1e-6:
        flat /= np.float32(mean)
    return flat


def normalise_flat(flat: np.ndarray) -> np.ndarray:
    """A flat divided by its mean over usable pixels; pixels ≤ 0 or non-finite become NaN.

    Dividing by NaN gives NaN, never inf, so dead flat pixels show as NaN in the light.
    """
    out, usable = _usable_flat(flat)
    if not usable.any():
        raise ValueError("flat has no positive finite pixel")
    return _scaled(out, float(np.mean(out[usable], dtype=np.float64)))


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


def check_master_shapes(
    shape: tuple[int, ...], masters: Mapping[str, np.ndarray | MasterRows | None]
) -> None:
    """FitsError naming the first master (by role) whose shape is not the light's ``shape``."""
    for role, master in masters.items():
        if master is not None and master.shape != shape:
            raise FitsError(f"{role} shape {master.shape} differs from the light's {shape}")


class MasterRows:
    """A master too big to hold whole (over :data:`~imgproc.limits.WHOLE_FRAME_MAX_BYTES`), as
    calibration uses it: prepared once into a native float32 file (:func:`prepared_master`) and
    memory-mapped, so ``master[rows]`` is a read-only view of what the same rows of the whole
    master (:class:`MasterCache`.get) hold. The pages of the rows asked for before are dropped
    from the process when the next rows are asked for (they stay in the page cache): a worker
    holds a block of the master at a time, not the master. Reading and normalising a 61-MP
    flat's rows from its FITS file for every light took 117 ms; mapping them (and copying
    them out) takes 32 ms."""

    nbytes = 0  # what it holds: a block of pages

    def __init__(self, role: str, rows: PlainRows, folder: Path) -> None:
        self.shape = rows.shape
        with prepared_master(role, rows, folder).open("rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
        self._pixels = np.frombuffer(self._map, np.float32).reshape(self.shape)
        self._held = range(0)  # the bytes of the rows asked for last

    def __getitem__(self, rows: slice) -> np.ndarray:
        if self._held:  # another thread's block dropped too is read again from the page cache
            start = self._held.start - self._held.start % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, start, self._held.stop - start)
        row_bytes = 4 * self.shape[1]
        self._held = range(rows.start * row_bytes, rows.stop * row_bytes)
        return self._pixels[rows]


def prepared_master(role: str, rows: PlainRows, folder: Path) -> Path:
    """The file of ``folder`` that holds a big master as calibration uses it: native float32, a
    flat divided by its mean over usable pixels and NaN where unusable (the pixels of
    :func:`normalise_flat`). Made once, from the master a block of rows at a time, and kept
    while the master's size and modification time are unchanged (they are in its name, and a
    new version replaces the files of older ones). Workers that need it at once wait for the
    one making it (a lock file beside it) rather than each make it too."""
    stat = rows.path.stat()
    source = hashlib.sha256(os.fsencode(rows.path.resolve())).hexdigest()[:16]
    path = folder / f"{role}-{source}-{stat.st_size}-{stat.st_mtime_ns}.f32"
    ny, nx = rows.shape

    def made() -> bool:
        return path.is_file() and path.stat().st_size == 4 * ny * nx

    if made():
        return path
    with locked(path.with_suffix(".lock")):
        if made():  # by the worker that held the lock
            return path
        mean = _flat_mean(rows) if role == "flat" else None
        with replaced_atomically(path) as temporary, temporary.open("wb") as out:
            step = max(1, BLOCK_BYTES // (4 * nx))
            for start in range(0, ny, step):
                block = rows.read(start, min(ny, start + step))
                out.write(block if mean is None else _scaled(_usable_flat(block)[0], mean))
    for older in folder.glob(f"{role}-{source}-*"):  # its .f32 and .lock
        if older.stem != path.stem:
            older.unlink(missing_ok=True)
    return path


def _flat_mean(rows: PlainRows) -> float:
    """Mean of a flat's usable pixels, read by blocks into one array as ``flat[usable]`` would
    hold them (the same float64 mean to the last bit), without the whole flat and its mask."""
    ny, nx = rows.shape
    values = np.empty(ny * nx, np.float32)
    count, step = 0, max(1, (16 << 20) // (4 * nx))
    for start in range(0, ny, step):
        block = rows.read(start, min(start + step, ny))
        kept = block[_usable(block)]
        values[count : count + kept.size] = kept
        count += kept.size
    if not count:
        raise ValueError("flat has no positive finite pixel")
    return float(np.mean(values[:count], dtype=np.float64))


class MasterCache:
    """Master frames, read once per process (flats normalised once) and shared read-only.

    Keyed by role, path, size and modification time, so a replaced master is read again. The
    workflow's batch jobs run as threads of one process and share :data:`MASTERS`; it holds at
    most ``max_bytes`` of pixels, dropping the least recently used master first.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self._files: FileCache[np.ndarray | MasterRows] = FileCache(max_bytes)

    def get(self, role: str, path: str) -> np.ndarray:
        """The master of ``role`` at ``path`` as read-only float32 (flats normalised)."""
        return self._files.get(role, path, lambda: _read_master(role, path))  # type: ignore[return-value]

    def rows(self, role: str, path: str, prepared: Path) -> np.ndarray | MasterRows:
        """The master of ``role`` at ``path`` to be indexed by row slices: :meth:`get`'s whole
        frame, or for a plain file of a frame over :data:`~imgproc.limits.WHOLE_FRAME_MAX_BYTES`, a
        :class:`MasterRows` prepared in the folder ``prepared``."""
        return self._files.get(f"{role} rows", path, lambda: _master_rows(role, path, prepared))

    def get_colour(self, role: str, path: str, pattern: str) -> np.ndarray:
        """The master of ``role`` for colour lights of CFA ``pattern``: a flat is normalised per
        colour (:func:`imgproc.colour.normalise_colour_flat`), other roles as :meth:`get`."""
        if role != "flat":
            return self.get(role, path)
        return self._files.get(f"flat {pattern}", path, lambda: _read_master(role, path, pattern))


def _read_master(role: str, path: str, pattern: str | None = None) -> np.ndarray:
    try:
        data, _ = read_image(Path(path))
        if role == "flat":
            frame = normalise_flat(data) if pattern is None else normalise_colour_flat(data, pattern)
        else:
            frame = data
    except ValueError as exc:  # FitsError, or a flat without a usable pixel: the master is unusable
        raise FitsError(f"master {Path(path).name}: {exc}") from exc
    frame.flags.writeable = False
    return frame


def _master_rows(role: str, path: str, prepared: Path) -> np.ndarray | MasterRows:
    try:
        plain = PlainRows(Path(path))
    except (OSError, ValueError):  # not a plain image: read whole (or fail) as ever
        plain = None
    if plain is None or held_whole(plain.shape):
        return _read_master(role, path)
    try:
        return MasterRows(role, plain, prepared)
    except ValueError as exc:  # a flat without a usable pixel, a truncated file
        raise FitsError(f"master {plain.path.name}: {exc}") from exc


MASTERS = MasterCache()


@dataclass(frozen=True)
class LightSettings:
    """What calibrating one light takes besides its pixels and masters (a plan row's values)."""

    observer: str  # the OBSERVER card
    mid: datetime  # mid-exposure time (UTC)
    exptime: float  # exposure (s), as the plan read it
    binning: int = 1
    dark_scale: float | None = None  # the dark's multiplier (one of another exposure)
    cfa: str | None = None  # a colour light's CFA pattern as stored
    channel: str | None = None  # the output channel of a colour light
    object_name: str | None = None  # OBJECT for a light without one (--object)
    cards: Sequence[tuple[str, str, str]] = ()  # (keyword, value, comment) set last


def calibrated_header(
    header: fits.Header, masters: Mapping[str, str | None], light: LightSettings
) -> fits.Header:
    """The light's header with calibration flags, master file names, OBSERVER, binning and a
    HISTORY line; scaling and checksum cards removed, and EQUINOX or EPOCH if not a number; the
    UTC time cards of ``light``'s mid-exposure and exposure and
    AIRMASS (:func:`imgproc.timecards.apply_time_cards`). A scaled dark gets DARKSCAL and a HISTORY
    line naming the dark and the ratio. The light's own OBSERVER, when it differs from
    ``light.observer``, is kept as ORIGOBS; ``light.object_name`` (``--object``, for a light
    without OBJECT) becomes OBJECT. ``light.cards`` (keyword, value, comment) are set last."""
    observer, mid, exptime, dark_scale = light.observer, light.mid, light.exptime, light.dark_scale
    out = bin_header(header, light.binning)
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
            set_card(out, _FILE_CARDS[role], Path(path).name, f"master {role} used")
    original = out.get("OBSERVER")
    if isinstance(original, str) and original.strip() and original != observer:
        set_card(out, "ORIGOBS", original, "camera's OBSERVER")
    out.set("OBSERVER", observer, "observer code")
    if light.object_name:
        set_card(out, "OBJECT", light.object_name, "from imgproc --object: none in the header")
    apply_time_cards(out, [(mid - timedelta(seconds=exptime / 2.0), exptime)], header_airmass(header, [mid]))
    out.add_history(f"Calibrated by imgproc {__version__}")
    if masters.get("dark") is not None and dark_scale is not None:
        out.set("DARKSCAL", float(dark_scale), "dark scaled by the exposure ratio light/dark")
        out.add_history(f"dark {Path(masters['dark']).name} scaled by {dark_scale:.6g} (exposure ratio)")
    for key, value, comment in light.cards:
        set_card(out, key, value, comment)
    return out


def calibrate_frame(
    light_path: Path,
    hdu: int,
    masters: Mapping[str, str | None],
    cache: MasterCache,
    target: Path,
    light: LightSettings,
    *,
    prepared: Path,
) -> tuple[np.ndarray, fits.Header]:
    """Read, calibrate and bin one light into the float32 FITS file ``target``; returns its
    pixels and header. ``light.dark_scale`` multiplies the dark (one of another exposure). A
    colour light (``light.cfa`` its pattern as stored) is calibrated in the mosaic and becomes its
    output ``light.channel`` (:func:`calibrate_colour_frame`). Masters too big to hold whole
    are prepared in the folder ``prepared`` (:class:`MasterRows`).

    The frame streams through in blocks of rows (a multiple of ``binning``) that stay in the
    CPU cache from the read through calibration and binning to the write, instead of a
    dozen passes over the whole frame. The pixels are the same as :func:`calibrate_image`
    and :func:`bin_image` of the whole frame give. A frame over :data:`~imgproc.limits.WHOLE_FRAME_MAX_BYTES`
    is not held whole: the unbinned pixels returned are then ``target`` memory-mapped (read as
    they are used; its stars are measured from the file, a band of rows at a time).
    """
    if light.cfa:
        return calibrate_colour_frame(light_path, hdu, masters, cache, target, light)
    binning, dark_scale = light.binning, light.dark_scale
    header, shape, image, blocks = image_blocks(light_path, hdu, binning, limits.WHOLE_FRAME_MAX_BYTES)
    frames = {role: cache.rows(role, path, prepared) for role, path in masters.items() if path is not None}
    check_master_shapes(shape, frames)  # whole frames: each block's slices would agree
    out_header = calibrated_header(header, masters, light)
    binned = None if binning == 1 else np.empty(binned_shape(shape, binning), np.float32)
    with ImageWriter(target, out_header, shape if binned is None else binned.shape) as out:
        for rows, pixels in blocks:
            masters_rows = [frames[role][rows] if role in frames else None for role in ROLES]
            part = calibrate_image(pixels, *masters_rows, dark_scale=dark_scale, in_place=True)
            if binned is not None:
                if len(part) < binning:  # the remainder rows binning drops
                    continue
                part = bin_image(part, binning)
                first = rows.start // binning
                binned[first : first + len(part)] = part
            out.write(part)
    if binned is not None:
        return binned, out_header
    return (Float32Rows(target).memmap() if image is None else image), out_header


@dataclass(frozen=True)
class CalibratedMosaic:
    """A colour light calibrated in its mosaic (read-only pixels) and its raw header."""

    data: np.ndarray
    header: fits.Header

    @property
    def nbytes(self) -> int:
        """Bytes of the pixels."""
        return int(self.data.nbytes)


#: Colour lights calibrated in their mosaic by this process's job threads. A light's channel
#: frames are consecutive entries of the plan (and so of a batch): its mosaic is read and
#: calibrated once for all of them. Holds 256 MB, or the newest mosaic when it is bigger.
MOSAICS: FileCache[CalibratedMosaic] = FileCache(256 * 1024**2)


def calibrated_mosaic(
    light_path: Path, hdu: int, masters: Mapping[str, str | None], cache: MasterCache, light: LightSettings
) -> CalibratedMosaic:
    """A colour light (``light.cfa`` its pattern as stored) calibrated in its mosaic, pixel by
    pixel, the flat normalised per colour; from :data:`MOSAICS` when the same light was just
    calibrated with the same masters (unchanged files) and dark scale."""
    cfa = str(light.cfa)

    def make() -> CalibratedMosaic:
        image, header = read_image(light_path, hdu)
        frames = {role: cache.get_colour(role, path, cfa) for role, path in masters.items() if path}
        check_master_shapes(image.shape, frames)
        mosaic = calibrate_image(
            image, *(frames.get(role) for role in ROLES), dark_scale=light.dark_scale, in_place=True
        )
        mosaic.flags.writeable = False  # shared by the light's channel frames
        return CalibratedMosaic(mosaic, header)

    files = {role: (path, os.stat(path)) for role, path in sorted(masters.items()) if path}
    used = tuple((role, path, st.st_size, st.st_mtime_ns) for role, (path, st) in files.items())
    return MOSAICS.get(("mosaic", hdu, cfa, used, light.dark_scale), str(light_path), make)


def calibrate_colour_frame(
    light_path: Path,
    hdu: int,
    masters: Mapping[str, str | None],
    cache: MasterCache,
    target: Path,
    light: LightSettings,
) -> tuple[np.ndarray, fits.Header]:
    """Calibrate a colour light in its mosaic (:func:`calibrated_mosaic`) and write its
    ``light.channel`` (:func:`imgproc.colour.colour_image`, green by default) to ``target``; the
    header as :func:`calibrated_header` makes it (binned afterwards with the channel)."""
    mosaic = calibrated_mosaic(light_path, hdu, masters, cache, light)
    out_header = calibrated_header(mosaic.header, masters, replace(light, binning=1))
    data, out_header = colour_image(
        mosaic.data, out_header, str(light.cfa), light.channel or "G", light.binning
    )
    if data.ndim == 3:
        write_cube(target, data, out_header)
    else:
        write_atomic(target, data, out_header)
    return data, out_header
