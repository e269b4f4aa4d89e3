"""FITS input and output: which files are FITS, where the image is, and atomic writing."""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

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


def open_fits(path: Path) -> fits.HDUList:
    """Open a FITS file for reading, turning astropy's varied failures into FitsError."""
    if path.stat().st_size == 0:
        raise FitsError("file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            return fits.open(path, memmap=False, lazy_load_hdus=True)
    except (OSError, ValueError, TypeError) as exc:
        raise FitsError(f"not a readable FITS file ({exc})") from exc


_BLOCK = 2880
_END = re.compile(rb"END {77}")


def _primary_image_header(path: Path) -> tuple[fits.Header, int] | None:
    """The header of a plain file's 2-D primary image and where its data start, read directly
    (3x faster than opening the file through astropy); None for anything else (an image in an
    extension, compressed or gzipped files, damaged headers), which astropy then reads."""
    if path.name.lower().endswith((".gz", ".fz")):
        return None
    with path.open("rb") as handle:
        raw = b""
        while len(raw) < 100 * _BLOCK:
            block = handle.read(_BLOCK)
            if len(block) < _BLOCK or (not raw and not block.startswith(b"SIMPLE  =")):
                return None
            raw += block
            end = next((m for m in _END.finditer(block) if m.start() % 80 == 0), None)
            if end is not None:
                break
        else:
            return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            header = fits.Header.fromstring(raw.decode("ascii"))
        if header.get("SIMPLE") is not True or header.get("NAXIS") != 2:
            return None
        if not header.get("NAXIS1") or not header.get("NAXIS2"):
            return None
    except (ValueError, UnicodeDecodeError, KeyError):
        return None
    return header, len(raw)


def read_header(path: Path) -> tuple[fits.Header, int, tuple[int, int]]:
    """Header, HDU index and (ny, nx) shape of the image in ``path``, without reading pixels."""
    plain = _primary_image_header(path)
    if plain is not None:
        header, data_start = plain
        return header, 0, _checked_shape(path, header, data_start, compressed=False)
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
    header = hdul[index].header.copy()
    if index == 0:
        return header
    inherit = header.get("INHERIT", True) is not False
    for key in _EXTENSION_CARDS:
        header.remove(key, ignore_missing=True, remove_all=True)
    if inherit:
        for card in hdul[0].header.cards:
            key = card.keyword
            if key not in _PRIMARY_OWN_CARDS and not key.startswith("NAXIS") and key not in header:
                header.append(card)
    return header


_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", -32: ">f4", -64: ">f8"}


class Float32Rows:
    """Row ranges of a plain float32 primary image (an imgproc intermediate), each read with
    one seek and one read: a stack reads every frame a strip at a time, and opening the file
    through astropy for each strip cost five times the reading."""

    def __init__(self, path: Path) -> None:
        primary = _primary_image_header(path)
        layout = primary and _plain_layout(*primary, False, path)
        if not primary or not layout or layout[1:] != (">f4", 0.0):
            raise FitsError(f"{path.name}: not a plain float32 image")
        self.path, self._start = path, layout[0]
        self.shape = (int(primary[0]["NAXIS2"]), int(primary[0]["NAXIS1"]))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (within the image) as stored: big-endian float32."""
        nx = self.shape[1]
        rows = np.empty((stop - start, nx), ">f4")
        with self.path.open("rb") as handle:
            handle.seek(self._start + start * nx * 4)
            got = handle.readinto(rows)  # type: ignore[arg-type]
        if got != rows.nbytes:
            raise FitsError(f"{self.path.name}: truncated: rows {start}-{stop} of {self.shape[0]} missing")
        return rows


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
    primary = _primary_image_header(path) if hdu in (None, 0) else None
    plain = primary and _plain_layout(primary[0], primary[1], False, path)
    if primary and plain:  # the usual camera file: no need to open it through astropy
        header = primary[0]
        shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
        image = np.empty(shape, np.float32)
        return header, image, _plain_blocks(path, plain, image, _block_rows(shape, multiple))
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
            image = np.empty(shape, np.float32)
            return header, image, _plain_blocks(path, plain, image, step)
        if data is None or data.ndim != 2:
            raise FitsError("no 2-D pixel data")
        if data.shape != shape:
            raise FitsError(f"truncated: data shape {data.shape} but header says {shape}")
        image = np.asarray(data, dtype=np.float32)
    blocks = (slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step))
    return header, image, blocks


def _plain_blocks(
    path: Path, layout: tuple[int, str, float], image: np.ndarray, step: int
) -> Iterator[slice]:
    """Read ``image`` from a plain file block by block, yielding each block's rows."""
    offset, dtype, zero = layout
    ny, nx = image.shape
    with path.open("rb") as handle:
        handle.seek(offset)
        for start in range(0, ny, step):
            block = slice(start, min(start + step, ny))
            count = (block.stop - start) * nx
            raw = np.fromfile(handle, dtype=dtype, count=count)
            if raw.size != count:
                raise FitsError(f"truncated: {start * nx + raw.size} of {ny * nx} pixels present")
            part = image[block]
            np.copyto(part, raw.reshape(-1, nx), casting="unsafe")
            if zero:
                part += np.float32(zero)
            yield block


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
    """Why the pixels of ``path``, a plain float32 file imgproc wrote, do not match its DATASUM
    card ("" when they do). Reads the whole data unit, 16 MiB at a time."""
    try:
        primary = _primary_image_header(path)
        if primary is None:
            return f"{path.name} is not a plain FITS image"
        header, start = primary
        nbytes = -(-int(header["NAXIS1"]) * int(header["NAXIS2"]) * abs(int(header["BITPIX"])) // 8 // 2880)
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
