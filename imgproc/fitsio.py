"""FITS input and output: which files are FITS, where the image is, and atomic writing."""

from __future__ import annotations

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
            header = hdul[index].header.copy()
        except FitsError:
            raise
        except (OSError, ValueError, IndexError) as exc:
            raise FitsError(f"damaged FITS structure ({exc})") from exc
        compressed = isinstance(hdul[index], fits.CompImageHDU)
        data_start = hdul.fileinfo(index)["datLoc"]
    if compressed:
        header = _strip_compression(header)
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


def _strip_compression(header: fits.Header) -> fits.Header:
    """The image header of a tile-compressed HDU, without its table-only cards."""
    clean = header.copy()
    for key in ("XTENSION", "PCOUNT", "GCOUNT", "EXTNAME"):
        clean.remove(key, ignore_missing=True, remove_all=True)
    return clean


_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", -32: ">f4", -64: ">f8"}


def read_image(path: Path, hdu: int | None = None) -> tuple[np.ndarray, fits.Header]:
    """Pixels as float32 (BZERO/BSCALE applied) and the header of the image in ``path``.

    Plain uncompressed images (the usual camera file: BITPIX 16 with BZERO 32768) are read
    straight into numpy, three times faster than through astropy's scaling; compressed,
    gzipped, BSCALEd or BLANK-flagged images go through astropy.
    """
    with open_fits(path) as hdul:
        index = find_image(hdul) if hdu is None else hdu
        try:
            header = hdul[index].header.copy()
            plain = _plain_layout(hdul, index, path)
            data = None if plain else hdul[index].data
        except (OSError, ValueError, TypeError, IndexError) as exc:
            raise FitsError(f"cannot read the pixels ({exc})") from exc
        expected = (int(header["NAXIS2"]), int(header["NAXIS1"]))
        if plain:
            offset, dtype, zero = plain
            count = expected[0] * expected[1]
            raw = np.fromfile(path, dtype=dtype, count=count, offset=offset)
            if raw.size != count:
                raise FitsError(f"truncated: {raw.size} of {count} pixels present")
            image = raw.reshape(expected).astype(np.float32)
            if zero:
                image += np.float32(zero)
            return image, header
        if data is None or data.ndim != 2:
            raise FitsError("no 2-D pixel data")
        if data.shape != expected:
            raise FitsError(f"truncated: data shape {data.shape} but header says {expected}")
        image = np.asarray(data, dtype=np.float32)
        if isinstance(hdul[index], fits.CompImageHDU):
            header = _strip_compression(header)
    return image, header


def _plain_layout(hdul: fits.HDUList, index: int, path: Path) -> tuple[int, str, float] | None:
    """(data offset, numpy dtype, BZERO) when the image can be read directly, else None."""
    header = hdul[index].header
    bitpix = header.get("BITPIX")
    if (
        isinstance(hdul[index], fits.CompImageHDU)
        or path.name.lower().endswith(".gz")
        or bitpix not in _DTYPES
    ):
        return None
    zero, scale = header.get("BZERO", 0), header.get("BSCALE", 1)
    integer_zero = bitpix > 0 and zero == (2 ** (bitpix - 1) if bitpix > 8 else -128)
    if scale != 1 or (zero != 0 and not integer_zero) or (bitpix > 0 and "BLANK" in header):
        return None
    return hdul.fileinfo(index)["datLoc"], _DTYPES[bitpix], float(zero)


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


#: Rows converted to big-endian and summed per write: about 1 MB, so it stays in the CPU cache.
_WRITE_CHUNK_BYTES = 1 << 20


def write_atomic(path: Path, data: np.ndarray, header: fits.Header) -> None:
    """Write float32 pixels as a primary-HDU FITS file with CHECKSUM/DATASUM, atomically.

    The file is written to a temporary name in the same folder and renamed over ``path``, so a
    crash leaves at worst a ``.tmp`` file, never a half-written result.  The pixels go out in
    cache-sized chunks, each byte-swapped and added to the data sum on its way; the header is
    written first with placeholder checksums and rewritten in place (same length) at the end.
    The checksums carry a fixed comment: no wall-clock time goes into the file.
    """
    native = np.ascontiguousarray(data, dtype=np.float32)
    hdu = fits.PrimaryHDU(data=native, header=header)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        hdu.verify("silentfix")
    head = hdu.header
    for key in ("CHECKSUM", "DATASUM"):
        head.remove(key, ignore_missing=True, remove_all=True)
    head["CHECKSUM"] = ("0" * 16, "imgproc")
    head["DATASUM"] = ("0", "imgproc")
    placeholder = head.tostring().encode("ascii")
    flat = native.reshape(-1)
    step = max(1, _WRITE_CHUNK_BYTES // 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb", buffering=0) as handle:
            handle.write(placeholder)
            datasum = 0
            for start in range(0, flat.size, step):
                chunk = flat[start : start + step]
                # a word of the file, read big-endian, is the native uint32 of the same pixel:
                # the sum runs on the native chunk
                datasum = ones_complement_sum(chunk.view(np.uint32), datasum)
                handle.write(chunk.astype(">f4"))
            handle.write(bytes(-flat.nbytes % 2880))  # zeros: they add nothing to the sum
            head["DATASUM"] = (str(datasum), "imgproc")
            head["CHECKSUM"] = (encode_checksum(~ones_complement_sum(head.tostring().encode("ascii"), datasum)
                                                & 0xFFFFFFFF), "imgproc")  # fmt: skip
            handle.seek(0)  # same cards, same length: the header is overwritten in place
            handle.write(head.tostring().encode("ascii"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def link_atomic(source: Path, target: Path) -> None:
    """Make ``target`` the same file as ``source`` (hard link, or copy across file systems)."""
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
