"""The manifest: one row per input file, with its normalised header, role and status.

This module is the table (which files, columns, statuses, TSV format) and imports no astropy,
so the Snakefile can read it at parse time; :mod:`imgproc.scan` fills it from the headers.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: File name endings taken as FITS input (compared case-insensitively).
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".ftz", ".fz", ".fits.gz", ".fit.gz", ".fts.gz")

#: Folder roles: where a file was found.
FOLDER_ROLES = ("light", "bias", "dark", "flat")

#: Manifest columns, in order; numbers parse back as float (or int for the INT set).
COLUMNS = (
    "path", "folder", "role", "status", "reason", "error", "size", "mtime_ns", "hdu", "ny", "nx",
    "imagetyp_raw", "is_master", "object", "filter", "exptime", "date_obs", "instrume", "gain",
    "offset", "readoutm", "set_temp", "xbinning", "ybinning", "pierside", "header_sha1", "table_sha1",
    "bayerpat",
)  # fmt: skip
_FLOAT = frozenset({"exptime", "gain", "offset", "set_temp", "dark_scale"})
_INT = frozenset({"size", "mtime_ns", "hdu", "ny", "nx", "xbinning", "ybinning", "n_group", "n_frames"})
_BOOL = frozenset({"is_master", "thumb"})

#: Status values: ``ok`` (used), ``listed`` (left out on purpose), ``skipped`` (bad input);
#: a batch receipt item is also ``failed`` when making it raised an internal error.
OK, LISTED, SKIPPED, FAILED = "ok", "listed", "skipped", "failed"


def is_fits_name(name: str) -> bool:
    """True when ``name`` ends with one of :data:`FITS_SUFFIXES`, in any case (not hidden)."""
    lower = name.lower()
    return not lower.startswith(".") and lower.endswith(FITS_SUFFIXES)


def list_fits(folder: Path) -> list[Path]:
    """FITS files directly inside ``folder``, sorted by name (no header is read)."""
    with os.scandir(folder) as entries:
        return sorted(Path(entry.path) for entry in entries if entry.is_file() and is_fits_name(entry.name))


def apply_policy(rows: list[dict], wanted_filter: str | None) -> list[dict]:
    """Statuses that depend on more than one file: non-lights in the input folder, the
    ``-f`` filter, and the same frame present twice under two names."""
    seen: dict[str, str] = {}
    for row in rows:
        row.update(status=OK, reason="")
        if row["error"]:
            row.update(status=SKIPPED, reason=row["error"])
        elif row["folder"] == "light" and row["role"] != "light":
            row.update(
                status=LISTED, reason=f"{row['role']} frame in the light folder: listed, not processed"
            )
        elif row["folder"] == "light" and wanted_filter is not None and row["filter"] != wanted_filter:
            row.update(status=LISTED, reason=f"filter {row['filter']!r} is not {wanted_filter!r} (-f)")
        elif row["folder"] == "light":
            first = seen.setdefault(row["header_sha1"], row["path"])
            if first != row["path"]:
                row.update(status=SKIPPED, reason=f"duplicate of {Path(first).name} (identical header)")
    return rows


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value).replace("\t", " ").replace("\n", " ")


def _parse(column: str, text: str) -> Any:
    if text == "":
        return None
    if column in _FLOAT:
        return float(text)
    if column in _INT:
        return int(text)
    if column in _BOOL:
        return text == "1"
    return text


def write_tsv(path: Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> None:
    """Write rows as a tab-separated table (atomically: temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_format(row.get(column)) for column in columns])
    os.replace(tmp, path)


def read_tsv(path: Path) -> list[dict[str, Any]]:
    """Read a table written by :func:`write_tsv`, with numbers and flags parsed back."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        return [{key: _parse(key, value) for key, value in row.items()} for row in reader]
