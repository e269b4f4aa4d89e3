"""FITS input and output: which files are FITS, where the image is, and atomic writing."""

from __future__ import annotations

import bz2
import fcntl
import functools
import gzip
import io
import math
import os
import re
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning


class FitsError(ValueError):
    """A file that cannot be used as an image, with the reason."""


def _image_hdus(hdul: fits.HDUList) -> Iterator[tuple[int, fits.hdu.base.ExtensionHDU]]:
    for index, hdu in enumerate(hdul):
        if hdu.is_image and hdu.header.get("NAXIS", 0) >= 1:
            yield index, hdu


def find_image(hdul: fits.HDUList) -> int:
    """Index of the first HDU holding a 2-D image (fpack files keep it in HDU 1).

    Raises FitsError for files with no image or whose first image is not 2-D.
    """
    for index, hdu in _image_hdus(hdul):
        naxis = hdu.header["NAXIS"]
        if naxis == 2:
            return index
        raise FitsError(f"image in HDU {index} has {naxis} axes; a 2-D frame is expected")
    raise FitsError("no image HDU")


#: The largest frame a file may claim when no limit is given (config ``limits.max_frame_mb``):
#: its pixels as float32, in bytes.
DEFAULT_MAX_FRAME_BYTES = 1024 * 1024**2
#: A header longer than this many 2880-byte blocks (36,000 cards) without END is rejected.
MAX_HEADER_BLOCKS = 1000
#: HDUs walked looking for the image before a file is rejected.
MAX_HDUS = 64


def regular_size(path: Path) -> int:
    """Size of ``path`` when it is a regular file (symlinks followed), else FitsError saying
    what it is: a folder, a FIFO, a dangling symlink... (a FIFO is never opened: that blocks)."""
    try:
        info = path.stat()
    except FileNotFoundError as exc:
        if path.is_symlink():
            raise FitsError(f"dangling symlink to {os.readlink(path)!r}") from exc
        raise
    if not stat.S_ISREG(info.st_mode):
        kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISSOCK: "a socket",
                 stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}  # fmt: skip
        kind = next((name for test, name in kinds.items() if test(info.st_mode)), "not a regular file")
        raise FitsError(f"{kind}, not a FITS file")
    return info.st_size


def open_fits(path: Path) -> fits.HDUList:
    """Open a FITS file for reading, turning astropy's varied failures into FitsError."""
    if regular_size(path) == 0:
        raise FitsError("file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            return fits.open(path, memmap=False, lazy_load_hdus=True)
    except (OSError, ValueError, TypeError) as exc:
        raise FitsError(f"not a readable FITS file ({exc})") from exc


_BLOCK = 2880
_END = re.compile(rb"END {77}")
#: Bytes no card may hold (FITS allows only printable ASCII; a NUL, TAB or newline breaks astropy).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Cards that say how to read the pixels: one that cannot be read makes the file unusable.
_STRUCTURAL = frozenset({"SIMPLE", "XTENSION", "BITPIX", "NAXIS", "BSCALE", "BZERO", "BLANK", "PCOUNT",
                         "GCOUNT", "ZIMAGE", "ZBITPIX", "ZNAXIS"})  # fmt: skip


def _read_header_blocks(handle: IO[bytes], first: bytes = b"") -> bytes:
    """The header from ``handle`` up to its END card (``first``: its first block, already read).

    FitsError when there is no END within :data:`MAX_HEADER_BLOCKS` blocks, so that a file of
    zeros behind a header is rejected without reading (or holding) the rest.
    """
    blocks = [first] if first else []
    while not blocks or not any(m.start() % 80 == 0 for m in _END.finditer(blocks[-1])):
        if len(blocks) >= MAX_HEADER_BLOCKS:
            raise FitsError(f"no END card in the first {MAX_HEADER_BLOCKS * _BLOCK} bytes of a header")
        block = handle.read(_BLOCK)
        if len(block) < _BLOCK:
            raise FitsError(f"truncated header: the file ends before its END card ({len(blocks)} blocks)")
        blocks.append(block)
    return b"".join(blocks)


def _primary_image_header(path: Path, naxis: tuple[int, ...] = (2,)) -> tuple[fits.Header, int] | None:
    """The header of a plain file's 2-D (or ``naxis``-D) primary image and where its data start, read directly
    (3x faster than opening the file through astropy); None for anything else (an image in an
    extension, compressed or gzipped files, non-ASCII headers), which astropy then reads.
    FitsError for a header without END (:func:`_read_header_blocks`) or with an unusable
    structural card (:func:`clean_header`)."""
    if path.name.lower().endswith((".gz", ".fz")):
        return None
    with path.open("rb") as handle:
        first = handle.read(_BLOCK)
        if len(first) < _BLOCK or not first.startswith(b"SIMPLE  ="):
            return None
        raw = _read_header_blocks(handle, first)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        header = clean_header(fits.Header.fromstring(text))
    if header.get("SIMPLE") is not True or header.get("NAXIS") not in naxis:
        return None
    if not all(header.get(f"NAXIS{axis}") for axis in range(1, header["NAXIS"] + 1)):
        return None
    return header, len(raw)


def _card_ok(card: fits.Card) -> bool:
    """True when ``card`` parses, verifies and holds no control byte nor a non-finite number."""
    try:
        value, image = card.value, card.image
    except Exception:  # astropy's VerifyError and whatever an odd card raises
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return not _CONTROL.search(image)


def clean_header(header: fits.Header) -> fits.Header:
    """``header`` with every card usable: control bytes (NUL, TAB, newline...) become spaces, and
    a card that still cannot be read (``EXPTIME = NaN``) is removed and kept as HISTORY text.

    Returns ``header`` itself when every card is fine (the usual case). FitsError when a card
    that says how to read the pixels (BITPIX, NAXISn, BSCALE, BZERO, BLANK...) cannot be read.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        if all(_card_ok(card) for card in header.cards):
            return header
        cleaned = fits.Header()
        for card in header.cards:
            if not _card_ok(card):
                text = _CONTROL.sub(" ", getattr(card, "_image", None) or "")
                card = fits.Card.fromstring(text.ljust(80)[:80])
                if not _card_ok(card):
                    key = text[:8].strip()
                    if key in _STRUCTURAL or key.startswith(("NAXIS", "ZNAXIS")):
                        raise FitsError(f"{key} cannot be read: {text.strip()!r}")
                    cleaned.add_history(f"imgproc: unreadable card removed: {text.strip()}"[:72])
                    continue
            cleaned.append(card)
        return cleaned


def set_card(header: fits.Header, key: str, value: object, comment: str) -> None:
    """Set a card, with ``comment`` only where the card has room for it: a long string value
    would have it cut, with astropy's warning."""
    if isinstance(value, str):
        room = 80 - 10 - len(value.replace("'", "''")) - 2 - 3
        comment = comment if len(comment) <= room else ""
    header.set(key, value, comment)


def _card_number(raw: bytes, key: str) -> int | None:
    """The integer value of card ``key`` in a raw header, or None when it is absent."""
    for start in range(0, len(raw), 80):
        card = raw[start : start + 80]
        if card[:8].rstrip() == key.encode() and card[8:10] == b"= ":
            text = card[10:].split(b"/")[0].strip()
            try:
                return int(text)
            except ValueError:
                raise FitsError(f"{key} is not an integer: {text.decode('ascii', 'replace')!r}") from None
    return None


def _open_stream(path: Path) -> IO[bytes]:
    """``path`` opened for reading, through gzip or bzip2 when its first bytes say so (as astropy
    opens it, whatever its name)."""
    handle = path.open("rb")
    magic = handle.read(3)
    handle.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=handle, mode="rb")  # type: ignore[return-value]
    if magic == b"BZh":
        return bz2.BZ2File(handle)  # type: ignore[return-value]
    return handle


def _check_frame(index: int, axes: list[int] | tuple[int, ...], max_frame_bytes: int | None) -> None:
    """FitsError when an image of ``axes`` (NAXIS1, NAXIS2...) in HDU ``index`` is larger, as
    float32, than ``max_frame_bytes``."""
    megabytes = math.prod(axes) * 4 / 1024**2 if axes else 0
    if max_frame_bytes is not None and megabytes > max_frame_bytes / 1024**2:
        shape = "x".join(str(n) for n in axes)
        raise FitsError(
            f"HDU {index} claims a {shape} image ({megabytes:.0f} MB as float32), more than "
            f"limits.max_frame_mb ({max_frame_bytes / 1024**2:.0f} MB)"
        )


def check_structure(path: Path, max_frame_bytes: int | None = DEFAULT_MAX_FRAME_BYTES) -> None:
    """Walk the HDU headers of ``path`` up to its first 2-D image (a compressed one included)
    and check what they claim before anything is allocated: every header ends within
    :data:`MAX_HEADER_BLOCKS` blocks, every data unit fits in the file (when it is not
    gzipped), and neither an image nor a data unit is larger than ``max_frame_bytes`` (the
    image's pixels counted as float32). Gzipped and bzip2 streams are decompressed only
    as far as that walk goes, so a file that inflates to gigabytes is rejected after
    ``max_frame_bytes`` at most. Raises FitsError with the reason.
    """
    size = regular_size(path)
    limit = max_frame_bytes if max_frame_bytes is not None else math.inf
    with _open_stream(path) as stream:
        plain = isinstance(stream, io.BufferedReader)
        offset = 0
        for index in range(MAX_HDUS):
            first = stream.read(_BLOCK)
            if len(first) < _BLOCK or not first.startswith(b"XTENSION=" if index else b"SIMPLE  ="):
                return  # not FITS, or not an HDU: astropy says what it is
            raw = _read_header_blocks(stream, first)
            bitpix = _card_number(raw, "BITPIX") or 0
            axes = [
                _card_number(raw, f"NAXIS{i}") or 0 for i in range(1, (_card_number(raw, "NAXIS") or 0) + 1)
            ]
            data = (
                abs(bitpix)
                // 8
                * (_card_number(raw, "GCOUNT") or 1)
                * ((_card_number(raw, "PCOUNT") or 0) + (math.prod(axes) if axes else 0))
            )
            image = raw.startswith(b"SIMPLE") or raw.startswith(b"XTENSION= 'IMAGE")
            if b"ZIMAGE  =                    T" in raw:
                n = _card_number(raw, "ZNAXIS") or 0
                axes, image = [_card_number(raw, f"ZNAXIS{i}") or 0 for i in range(1, n + 1)], True
            if image:
                _check_frame(index, axes, max_frame_bytes)
            if data > limit:
                raise FitsError(f"HDU {index} claims {data / 1024**2:.0f} MB of data, more than "
                                f"limits.max_frame_mb ({limit / 1024**2:.0f} MB)")  # fmt: skip
            offset += len(raw) + data + -data % _BLOCK
            if plain and offset - (-data % _BLOCK) > size:
                raise FitsError(f"truncated: {size} bytes, but HDU {index} needs {offset - (-data % _BLOCK)}")
            if image and axes and math.prod(axes):
                return
            stream.seek(offset)
    raise FitsError(f"no image in the first {MAX_HDUS} HDUs")  # astropy would read them all


def read_header(
    path: Path, max_frame_bytes: int | None = DEFAULT_MAX_FRAME_BYTES
) -> tuple[fits.Header, int, tuple[int, int]]:
    """Header (:func:`clean_header`), HDU index and (ny, nx) shape of the image in ``path``,
    without reading pixels. FitsError when the file is not a regular file, not FITS, damaged,
    truncated, or claims an image larger than ``max_frame_bytes`` (:func:`check_structure`)."""
    regular_size(path)
    plain = _primary_image_header(path)
    if plain is not None:
        header, data_start = plain
        shape = _checked_shape(path, header, data_start, compressed=False)
        _check_frame(0, shape[::-1], max_frame_bytes)
        return header, 0, shape
    check_structure(path, max_frame_bytes)
    with open_fits(path) as hdul:
        try:
            index = find_image(hdul)
            header = image_header(hdul, index)
        except FitsError:
            raise
        except (OSError, ValueError, IndexError) as exc:
            raise FitsError(f"damaged FITS structure ({exc})") from exc
        compressed = isinstance(hdul[index], fits.CompImageHDU)
        data_start = hdul.fileinfo(index)["datLoc"]
    return header, index, _checked_shape(path, header, data_start, compressed)


def _checked_shape(path: Path, header: fits.Header, data_start: int, compressed: bool) -> tuple[int, int]:
    """(ny, nx) of the image; an uncompressed file too short for its pixels is an error."""
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    if not compressed and not path.name.lower().endswith(".gz"):
        needed = data_start + abs(int(header["BITPIX"])) // 8 * shape[0] * shape[1]
        size = path.stat().st_size
        if size < needed:
            raise FitsError(f"truncated: {size} bytes, but the header needs {needed}")
    return shape


#: Cards of an extension that only describe it as an extension (or a compressed table).
_EXTENSION_CARDS = ("XTENSION", "PCOUNT", "GCOUNT", "EXTNAME", "EXTVER", "INHERIT")
#: Cards of a primary header that describe its own (empty) data unit, not the observation.
_PRIMARY_OWN_CARDS = frozenset({"SIMPLE", "BITPIX", "NAXIS", "EXTEND", "BZERO", "BSCALE", "BLANK", "CHECKSUM",
                                "DATASUM", "COMMENT", "HISTORY", ""})  # fmt: skip


def image_header(hdul: fits.HDUList, index: int) -> fits.Header:
    """The header of the image in HDU ``index``, as a primary image's.

    An image extension (an fpack ``.fz`` file's compressed HDU, an archive's ``SCI``) loses its
    extension-only cards and takes the observation cards of the empty primary header that it
    does not set itself (its own values win; none with ``INHERIT = F``).
    """
    header = clean_header(hdul[index].header.copy())
    if index == 0:
        return header
    inherit = header.get("INHERIT", True) is not False
    for key in _EXTENSION_CARDS:
        header.remove(key, ignore_missing=True, remove_all=True)
    if inherit:
        for card in clean_header(hdul[0].header).cards:
            key = card.keyword
            if key not in _PRIMARY_OWN_CARDS and not key.startswith("NAXIS") and key not in header:
                header.append(card)
    return header


_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", -32: ">f4", -64: ">f8"}


class Float32Rows:
    """Row ranges of a plain float32 primary image (an imgproc intermediate), or of one
    ``plane`` of a cube (an RGB intermediate), each read with one seek and one read: a stack
    reads every frame a strip at a time, and opening the file through astropy for each strip
    cost five times the reading."""

    def __init__(self, path: Path, plane: int | None = None) -> None:
        primary = _primary_image_header(path, (2,) if plane is None else (3,))
        layout = primary and _plain_layout(*primary, False, path)
        if not primary or not layout or layout[1:] != (">f4", 0.0):
            raise FitsError(f"{path.name}: not a plain float32 {'image' if plane is None else 'cube'}")
        self.header, self.shape = primary[0], (int(primary[0]["NAXIS2"]), int(primary[0]["NAXIS1"]))
        self.path, self._start = path, layout[0] + (plane or 0) * self.shape[0] * self.shape[1] * 4
        self._dtype = np.dtype(">f4")

    @classmethod
    def raw(cls, path: Path, shape: tuple[int, int], plane: int = 0) -> Float32Rows:
        """Rows of plane ``plane`` of a headerless file of native float32 planes of ``shape``
        (a resampled frame spilled from memory); its header is empty."""
        rows = cls.__new__(cls)
        rows.header, rows.shape, rows.path = fits.Header(), shape, path
        rows._start, rows._dtype = plane * shape[0] * shape[1] * 4, np.dtype(np.float32)
        return rows

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (within the image) as stored: big-endian float32 (native for
        :meth:`raw`)."""
        nx = self.shape[1]
        rows = np.empty((stop - start, nx), self._dtype)
        with self.path.open("rb") as handle:
            handle.seek(self._start + start * nx * 4)
            got = handle.readinto(rows)  # type: ignore[arg-type]
        if got != rows.nbytes:
            raise FitsError(f"{self.path.name}: truncated: rows {start}-{stop} of {self.shape[0]} missing")
        return rows

    def memmap(self) -> np.ndarray:
        """The whole image, memory-mapped read-only (as stored): only the pages a
        caller touches are read."""
        return np.memmap(self.path, self._dtype, "r", self._start, self.shape)


class PlainRows:
    """Row ranges of a plain primary image (one :func:`read_image_blocks` reads without astropy:
    a camera's integers with BZERO, or floats) as float32, the same values it gives; for a frame
    too big to hold whole, read a block of rows at a time."""

    def __init__(self, path: Path) -> None:
        primary = _primary_image_header(path)
        layout = primary and _plain_layout(*primary, False, path)
        if not primary or not layout:
            raise FitsError(f"{path.name}: not a plain image")
        self.path, self._layout = path, layout
        self.shape = _checked_shape(path, primary[0], primary[1], compressed=False)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (within the image) as native float32, BZERO applied."""
        offset, dtype, zero = self._layout
        nx = self.shape[1]
        count = (stop - start) * nx
        with self.path.open("rb") as handle:
            handle.seek(offset + start * nx * np.dtype(dtype).itemsize)
            raw = np.fromfile(handle, dtype=dtype, count=count)
        if raw.size != count:
            raise FitsError(f"{self.path.name}: truncated: rows {start}-{stop} of {self.shape[0]} missing")
        return _fill(np.empty((stop - start, nx), np.float32), raw, zero)


#: Rows per block when a frame is streamed: about 1 MB of float32, so a block stays in the CPU
#: cache from reading through calibration to writing.
BLOCK_BYTES = 1 << 20


def read_image(path: Path, hdu: int | None = None) -> tuple[np.ndarray, fits.Header]:
    """Pixels as float32 (BZERO/BSCALE applied) and the header of the image in ``path``."""
    header, image, blocks = read_image_blocks(path, hdu)
    for _ in blocks:
        pass
    return image, header


def read_image_blocks(
    path: Path, hdu: int | None = None, multiple: int = 1
) -> tuple[fits.Header, np.ndarray, Iterator[slice]]:
    """Header, float32 pixel array and an iterator over row slices of the image in ``path``.

    The array is filled as the iterator goes: once a slice is yielded, those rows are read
    (BZERO/BSCALE applied), so a caller can work on each block while it is in the CPU cache.
    Blocks are about :data:`BLOCK_BYTES` of float32, a multiple of ``multiple`` rows (binning).
    Plain uncompressed images (the usual camera file: BITPIX 16 with BZERO 32768) are read
    straight into numpy block by block, three times faster than through astropy's scaling;
    compressed, gzipped, BSCALEd or BLANK-flagged images go through astropy whole, before the
    first slice.
    """
    header, _, image, blocks = image_blocks(path, hdu, multiple)
    assert image is not None
    return header, image, (rows for rows, _ in blocks)


def image_blocks(
    path: Path, hdu: int | None = None, multiple: int = 1, whole_max_bytes: float = math.inf
) -> tuple[fits.Header, tuple[int, int], np.ndarray | None, Iterator[tuple[slice, np.ndarray]]]:
    """Header, shape, the whole float32 pixel array or None, and an iterator over (row slice,
    float32 rows) of the image in ``path``, read as :func:`read_image_blocks` reads it.

    A plain image bigger than ``whole_max_bytes`` (as float32) is not held whole: its rows come
    in one buffer reused from block to block (writable, valid until the next block), and the
    array returned is None. Other images are read into the whole array, the rows its slices.
    """
    primary = _primary_image_header(path) if hdu in (None, 0) else None
    plain = primary and _plain_layout(primary[0], primary[1], False, path)
    if primary and plain:  # the usual camera file: no need to open it through astropy
        header = primary[0]
        shape = _checked_shape(path, header, primary[1], compressed=False)
        image = np.empty(shape, np.float32) if shape[0] * shape[1] * 4 <= whole_max_bytes else None
        return header, shape, image, _plain_blocks(path, plain, shape, image, _block_rows(shape, multiple))
    with open_fits(path) as hdul:
        index = find_image(hdul) if hdu is None else hdu
        try:
            header = image_header(hdul, index)
            compressed = isinstance(hdul[index], fits.CompImageHDU)
            plain = _plain_layout(header, hdul.fileinfo(index)["datLoc"], compressed, path)
            data = None if plain else hdul[index].data
        except (OSError, ValueError, TypeError, IndexError) as exc:
            raise FitsError(f"cannot read the pixels ({exc})") from exc
        shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
        step = _block_rows(shape, multiple)
        if plain:
            image = np.empty(shape, np.float32) if shape[0] * shape[1] * 4 <= whole_max_bytes else None
            return header, shape, image, _plain_blocks(path, plain, shape, image, step)
        if data is None or data.ndim != 2:
            raise FitsError("no 2-D pixel data")
        if data.shape != shape:
            raise FitsError(f"truncated: data shape {data.shape} but header says {shape}")
        image = np.asarray(data, dtype=np.float32)
    starts = range(0, shape[0], step)
    blocks = ((rows, image[rows]) for rows in (slice(start, min(start + step, shape[0])) for start in starts))
    return header, shape, image, blocks


def _plain_blocks(
    path: Path, layout: tuple[int, str, float], shape: tuple[int, int], image: np.ndarray | None, step: int
) -> Iterator[tuple[slice, np.ndarray]]:
    """Read a plain file block by block, yielding each block's rows and pixels: in ``image`` (the
    whole frame), or, without it, in one buffer of ``step`` rows."""
    offset, dtype, zero = layout
    ny, nx = shape
    buffer = np.empty((min(step, ny), nx), np.float32) if image is None else None
    with path.open("rb") as handle:
        handle.seek(offset)
        for start in range(0, ny, step):
            block = slice(start, min(start + step, ny))
            count = (block.stop - start) * nx
            raw = np.fromfile(handle, dtype=dtype, count=count)
            if raw.size != count:
                raise FitsError(f"truncated: {start * nx + raw.size} of {ny * nx} pixels present")
            yield block, _fill(image[block] if buffer is None else buffer[: block.stop - start], raw, zero)


def _fill(rows: np.ndarray, raw: np.ndarray, zero: float) -> np.ndarray:
    """``rows`` (float32) set to the file's values ``raw`` plus BZERO ``zero``; returned."""
    np.copyto(rows, raw.reshape(rows.shape), casting="unsafe")
    if zero:
        rows += np.float32(zero)
    return rows


def _block_rows(shape: tuple[int, int], multiple: int) -> int:
    """Rows per streamed block: about :data:`BLOCK_BYTES` of float32, a multiple of ``multiple``."""
    fit = BLOCK_BYTES // (4 * max(1, shape[1]))
    return max(multiple, fit // multiple * multiple)


def _plain_layout(
    header: fits.Header, data_start: int, compressed: bool, path: Path
) -> tuple[int, str, float] | None:
    """(data offset, numpy dtype, BZERO) when the image can be read directly, else None."""
    bitpix = header.get("BITPIX")
    if compressed or path.name.lower().endswith(".gz") or bitpix not in _DTYPES:
        return None
    zero, scale = header.get("BZERO", 0), header.get("BSCALE", 1)
    integer_zero = bitpix > 0 and zero == (2 ** (bitpix - 1) if bitpix > 8 else -128)
    if scale != 1 or (zero != 0 and not integer_zero) or (bitpix > 0 and "BLANK" in header):
        return None
    return data_start, _DTYPES[bitpix], float(zero)


def ones_complement_sum(buffer: bytes | np.ndarray, start: int = 0) -> int:
    """32-bit ones' complement sum of big-endian words (the FITS checksum sum), vectorised."""
    words = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=">u4")
    total = int(words.sum(dtype=np.uint64)) + start
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


_EXCLUDED = frozenset(b":;<=>?@[\\]^_`")


def encode_checksum(value: int) -> str:
    """The 16-character ASCII encoding of a 32-bit value (FITS checksum convention)."""
    chars = [0] * 16
    for i in range(4):
        byte = (value >> (24 - 8 * i)) & 0xFF
        quotient, remainder = divmod(byte, 4)
        column = [quotient + 0x30] * 4
        column[0] += remainder
        changed = True
        while changed:
            changed = False
            for k in (0, 2):
                if column[k] in _EXCLUDED or column[k + 1] in _EXCLUDED:
                    column[k] += 1
                    column[k + 1] -= 1
                    changed = True
        for j in range(4):
            chars[4 * j + i] = column[j]
    return bytes(chars[-1:] + chars[:-1]).decode("ascii")


@functools.cache
def new_file_mode() -> int:
    """The permissions the umask gives any new file (``0o666 & ~umask``).

    Read from ``/proc/self/status`` where the kernel shows it: setting the umask to read it
    back is process-wide, and calibrate jobs write files from several threads at once.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


class ImageWriter:
    """A float32 primary-HDU FITS file with CHECKSUM/DATASUM, written row block by row block
    and atomically: ``with ImageWriter(path, header, shape) as out: out.write(rows) ...``.

    The file is written to a temporary name in the same folder and renamed over ``path`` when
    every row is in, so a crash or an error leaves at worst a ``.tmp`` file, never a
    half-written result. Each block is byte-swapped and added to the data sum on its way out;
    the header goes first with placeholder checksums and is rewritten in place (same cards,
    same length) at the end. The checksums carry a fixed comment: no wall-clock time goes
    into the file.
    """

    def __init__(self, path: Path, header: fits.Header, shape: tuple[int, int]) -> None:
        self.path, self.shape = path, shape
        # a zero-strided stand-in: astropy sets BITPIX and NAXISn from it without pixels
        hdu = fits.PrimaryHDU(data=np.broadcast_to(np.float32(0), shape), header=header)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            hdu.verify("silentfix")
        self.header = hdu.header
        for key in ("CHECKSUM", "DATASUM"):
            self.header.remove(key, ignore_missing=True, remove_all=True)
        self.header["CHECKSUM"] = ("0" * 16, "imgproc")
        self.header["DATASUM"] = ("0", "imgproc")
        self._rows = self._sum = 0

    def __enter__(self) -> ImageWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.fchmod(fd, new_file_mode())  # mkstemp makes it 0600; hard-linked outputs share it
        self._handle = os.fdopen(fd, "wb", buffering=0)
        try:
            self._handle.write(self.header.tostring().encode("ascii"))
        except BaseException:
            self._discard()
            raise
        return self

    def write(self, rows: np.ndarray) -> None:
        """Append the next rows (float32 or convertible, ``shape[1]`` columns)."""
        native = np.ascontiguousarray(rows, dtype=np.float32)
        if native.ndim != 2 or native.shape[1] != self.shape[1] or self._rows + len(native) > self.shape[0]:
            raise ValueError(f"rows of shape {native.shape} do not continue a {self.shape} image")
        flat = native.reshape(-1)
        step = BLOCK_BYTES // 4
        for start in range(0, flat.size, step):
            chunk = flat[start : start + step]
            # a word of the file, read big-endian, is the native uint32 of the same pixel
            self._sum = ones_complement_sum(chunk.view(np.uint32), self._sum)
            self._handle.write(chunk.astype(">f4"))
        self._rows += len(native)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            self._finish()
        except BaseException:
            self._discard()
            raise

    def _finish(self) -> None:
        if self._rows != self.shape[0]:
            raise ValueError(f"{self._rows} of {self.shape[0]} rows written to {self.path.name}")
        self._handle.write(bytes(-self._rows * self.shape[1] * 4 % 2880))  # zeros: add nothing
        self.header["DATASUM"] = (str(self._sum), "imgproc")
        head = ones_complement_sum(self.header.tostring().encode("ascii"), self._sum)
        self.header["CHECKSUM"] = (encode_checksum(~head & 0xFFFFFFFF), "imgproc")
        self._handle.seek(0)
        self._handle.write(self.header.tostring().encode("ascii"))
        self._handle.close()
        os.replace(self._tmp, self.path)

    def _discard(self) -> None:
        self._handle.close()
        Path(self._tmp).unlink(missing_ok=True)


@contextmanager
def replaced_atomically(target: Path) -> Iterator[Path]:
    """A new temporary file beside ``target`` to write, renamed over ``target`` when the block
    ends without an error and deleted when it raises: a crash never leaves half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (made empty if missing) for the block: another
    process or thread asking for it waits until the block ends. On a file system without locks
    (some network mounts) the block runs unlocked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        with suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def write_atomic(path: Path, data: np.ndarray, header: fits.Header) -> None:
    """Write float32 pixels as a primary-HDU FITS file with CHECKSUM/DATASUM, atomically
    (see :class:`ImageWriter`)."""
    native = np.ascontiguousarray(data, dtype=np.float32)
    with ImageWriter(path, header, native.shape) as out:
        out.write(native)


def link_atomic(source: Path, target: Path) -> None:
    """Make ``target`` the same file as ``source`` (hard link, or copy across file systems)."""
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


#: Bytes summed at a time by :func:`checksum_problem`.
_CHECK_CHUNK = 1 << 24


def checksum_problem(path: Path) -> str:
    """Why the pixels of ``path``, a plain float32 file (or RGB cube) imgproc wrote, do not match
    its DATASUM card ("" when they do). Reads the whole data unit, 16 MiB at a time."""
    try:
        primary = _primary_image_header(path, (2, 3))
        if primary is None:
            return f"{path.name} is not a plain FITS image"
        header, start = primary
        pixels = math.prod(int(header[f"NAXIS{axis}"]) for axis in range(1, header["NAXIS"] + 1))
        nbytes = -(-pixels * abs(int(header["BITPIX"])) // 8 // 2880)
        nbytes *= 2880
        total = 0
        with path.open("rb") as handle:
            handle.seek(start)
            for offset in range(0, nbytes, _CHECK_CHUNK):
                chunk = handle.read(min(_CHECK_CHUNK, nbytes - offset))
                if len(chunk) < min(_CHECK_CHUNK, nbytes - offset):
                    return f"{path.name} is truncated"
                total = ones_complement_sum(np.frombuffer(chunk, ">u4"), total)
    except (OSError, KeyError, ValueError) as exc:
        return f"{path.name} cannot be read ({exc})"
    if str(header.get("DATASUM")) != str(total):
        return f"{path.name}: its pixels do not match its DATASUM"
    return ""
