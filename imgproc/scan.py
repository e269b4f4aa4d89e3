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
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from imgproc.fitsio import FitsError, read_header
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

    def files(self) -> list[tuple[Path, str]]:
        """(path, folder role) of every FITS file to scan, subfolders included; no header is read."""
        found = [(path, "light") for path in list_fits(self.light_dir, self.exclude)]
        for role, folder in sorted(self.master_dirs.items()):
            found += [(path, role) for path in list_fits(folder, self.exclude)]
        return found


def table_digest(keywords: Mapping[str, list[str]]) -> str:
    """A short digest of the keyword table and the manifest columns, so cached rows are redone
    when either changes."""
    return hashlib.sha1(json.dumps([keywords, COLUMNS], sort_keys=True).encode()).hexdigest()[:12]


def scan_file(path: Path, folder: str, keywords: Mapping[str, list[str]]) -> dict[str, Any]:
    """One manifest row: the file's normalised header, role and (pre-filter) status."""
    stat = path.stat()
    row: dict[str, Any] = {
        "path": str(path), "folder": folder, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "table_sha1": table_digest(keywords), "error": "",
    }  # fmt: skip
    try:
        header, hdu, (ny, nx) = read_header(path)
    except (FitsError, OSError, KeyError, ValueError) as exc:
        row.update(role=folder, error=f"unreadable: {exc}")
        return row
    values = normalise(header, keywords, path.name)
    row.update({key: values.get(key) for key in COLUMNS if key in values})
    row.update(hdu=hdu, ny=ny, nx=nx, header_sha1=hashlib.sha1(header.tostring().encode()).hexdigest())
    row["is_master"] = is_master_type(values["imagetyp_raw"]) or "NCOMBINE" in header or "COMBINED" in header
    row["role"] = _role(folder, values["imagetyp"])
    row["error"] = _problem(row, values)
    return row


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
    return ""


def scan(request: ScanRequest, previous: Sequence[Mapping[str, Any]] = (), workers: int = 1) -> list[dict]:
    """Scan every file of ``request``; rows of unchanged files are taken from ``previous``."""
    digest = table_digest(request.keywords)
    cache = {
        (row["path"], row["folder"], row["size"], row["mtime_ns"], row.get("ctime_ns")): row
        for row in previous
        if row.get("table_sha1") == digest
    }
    todo: list[tuple[Path, str]] = []
    rows: dict[tuple[str, str], dict] = {}
    for path, folder in request.files():
        stat = path.stat()
        cached = cache.get((str(path), folder, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
        if cached is None:
            todo.append((path, folder))
        else:
            rows[(str(path), folder)] = dict(cached)
    for row in _scan_many(todo, request.keywords, workers):
        rows[(row["path"], row["folder"])] = row
    ordered = [rows[(str(path), folder)] for path, folder in request.files()]
    return apply_policy(ordered, request.filter)


def _scan_many(
    todo: list[tuple[Path, str]], keywords: Mapping[str, list[str]], workers: int
) -> Iterable[dict]:
    if workers <= 1 or len(todo) < POOL_MIN_FILES:
        return [scan_file(path, folder, keywords) for path, folder in todo]
    # forkserver, not fork: the scan runs in a thread of the Snakemake process
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("forkserver")) as pool:
        chunk = max(1, len(todo) // (workers * 4))
        return list(pool.map(scan_file, *zip(*todo, strict=True), [keywords] * len(todo), chunksize=chunk))
