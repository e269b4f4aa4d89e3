"""The scan: every input header read once into manifest rows.

The scan is the only step that opens raw headers; everything later reads the manifest TSV.
Rows of files whose path, size, modification and inode change times are unchanged are
reused from the previous manifest, so rescanning a night after adding frames reads only the new files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from imgproc.fitsio import DEFAULT_MAX_FRAME_BYTES, FitsError, read_header
from imgproc.keywords import DEFAULT_KEYWORDS, is_master_type, normalise
from imgproc.manifest import COLUMNS, FOLDER_ROLES, apply_policy, list_fits

#: Below this many files to read, worker processes cost more to start than they save (a header
#: takes about 0.8 ms; a worker about 0.5 s to start and import astropy).
POOL_MIN_FILES = 1000


@dataclass
class ScanRequest:
    """Which folders to scan and how to read their headers."""

    light_dir: Path
    master_dirs: dict[str, Path] = field(default_factory=dict)  # role -> folder
    keywords: Mapping[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_KEYWORDS))
    filter: str | None = None  # keep only lights with this normalised filter
    exclude: list[Path] = field(default_factory=list)  # folders not searched (the output folder)
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES  # larger images are skipped (limits.max_frame_mb)

    def files(self) -> list[tuple[Path, str]]:
        """(path, folder role) of every FITS file to scan, subfolders included; no header is read."""
        found = [(path, "light") for path in list_fits(self.light_dir, self.exclude)]
        for role, folder in sorted(self.master_dirs.items()):
            found += [(path, role) for path in list_fits(folder, self.exclude)]
        return found


def table_digest(
    keywords: Mapping[str, list[str]], max_frame_bytes: int | None = DEFAULT_MAX_FRAME_BYTES
) -> str:
    """A short digest of the keyword table, the frame size limit and the manifest columns, so
    cached rows are redone when any changes."""
    settings = [keywords, COLUMNS, max_frame_bytes]
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def scan_file(
    path: Path,
    folder: str,
    keywords: Mapping[str, list[str]],
    max_frame_bytes: int | None = DEFAULT_MAX_FRAME_BYTES,
) -> dict[str, Any]:
    """One manifest row: the file's normalised header, role and (pre-filter) status.

    Whatever goes wrong examining the file (not a regular file, unreadable, a hostile header,
    an image larger than ``max_frame_bytes``, even an internal error) makes the row's
    ``error``: that file is skipped with the reason, never the scan.
    """
    size, mtime_ns, ctime_ns = _identity(path)
    row: dict[str, Any] = {
        "path": str(path), "folder": folder, "size": size, "mtime_ns": mtime_ns, "ctime_ns": ctime_ns,
        "table_sha1": table_digest(keywords, max_frame_bytes), "error": "",
    }  # fmt: skip
    try:
        header, hdu, (ny, nx) = read_header(path, max_frame_bytes)
        values = normalise(header, keywords, path.name)
        header_sha1 = hashlib.sha1(header.tostring().encode()).hexdigest()
    except (FitsError, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc  # the path is the row's
        row.update(role=folder, error=f"unreadable: {reason}")
        return row
    except Exception as exc:  # a header no rule foresaw: that file, never the scan
        row.update(role=folder, error=f"unreadable: {type(exc).__name__}: {exc}")
        return row
    row.update({key: values.get(key) for key in COLUMNS if key in values})
    row.update(hdu=hdu, ny=ny, nx=nx, header_sha1=header_sha1)
    row["is_master"] = is_master_type(values["imagetyp_raw"]) or "NCOMBINE" in header or "COMBINED" in header
    row["role"] = _role(folder, values["imagetyp"])
    row["error"] = _problem(row, values)
    return row


def _identity(path: Path) -> tuple[int, int, int]:
    """(size, modification time, inode change time) of ``path``, zeros when it cannot be had (a
    dangling symlink): the row then says why."""
    try:
        info = path.stat()
    except OSError:
        return 0, 0, 0
    return info.st_size, info.st_mtime_ns, info.st_ctime_ns


def _role(folder: str, imagetyp: str | None) -> str:
    if folder == "light":
        return imagetyp or "light"
    return imagetyp if imagetyp in FOLDER_ROLES else folder


def _problem(row: Mapping[str, Any], values: Mapping[str, Any]) -> str:
    if row["role"] == "light" and values["date_error"]:
        return f"{values['date_error']}: the mid-exposure time cannot be computed"
    if row["role"] in ("light", "dark") and values["exptime"] is None:
        return "EXPTIME is missing or not a number"
    if row["role"] == "light" and values["exptime"] < 0:
        return f"EXPTIME {values['exptime']} is negative"
    if row["role"] == "light":
        try:  # the exposure's end must be a date too (time cards, stacks' spans)
            datetime.fromisoformat(values["date_obs"]) + timedelta(seconds=values["exptime"])
        except OverflowError:
            return f"DATE-OBS {values['date_obs']} + EXPTIME {values['exptime']} s is past the year 9999"
    return ""


def scan(request: ScanRequest, previous: Sequence[Mapping[str, Any]] = (), workers: int = 1) -> list[dict]:
    """Scan every file of ``request``; rows of unchanged files are taken from ``previous``."""
    digest = table_digest(request.keywords, request.max_frame_bytes)
    cache = {
        (row["path"], row["folder"], row["size"], row["mtime_ns"], row.get("ctime_ns")): row
        for row in previous
        if row.get("table_sha1") == digest
    }
    todo: list[tuple[Path, str]] = []
    rows: dict[tuple[str, str], dict] = {}
    for path, folder in request.files():
        cached = cache.get((str(path), folder, *_identity(path)))
        if cached is None:
            todo.append((path, folder))
        else:
            rows[(str(path), folder)] = dict(cached)
    for row in _scan_many(todo, request.keywords, request.max_frame_bytes, workers):
        rows[(row["path"], row["folder"])] = row
    ordered = [rows[(str(path), folder)] for path, folder in request.files()]
    return apply_policy(ordered, request.filter)


def _scan_many(
    todo: list[tuple[Path, str]], keywords: Mapping[str, list[str]], max_frame_bytes: int, workers: int
) -> Iterable[dict]:
    if workers <= 1 or len(todo) < POOL_MIN_FILES:
        return [scan_file(path, folder, keywords, max_frame_bytes) for path, folder in todo]
    # forkserver, not fork: the scan runs in a thread of the Snakemake process
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("forkserver")) as pool:
        chunk = max(1, len(todo) // (workers * 4))
        fixed = [keywords] * len(todo), [max_frame_bytes] * len(todo)
        return list(pool.map(scan_file, *zip(*todo, strict=True), *fixed, chunksize=chunk))
