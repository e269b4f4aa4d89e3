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

from imgproc.naming import safe_part

#: File name endings taken as FITS input (compared case-insensitively).
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".ftz", ".fz", ".fits.gz", ".fit.gz", ".fts.gz")

#: A file that marks an imgproc output folder (the resolved config); such folders are not searched.
OUTPUT_MARKER = "imgproc.yaml"

#: Folder roles: where a file was found.
FOLDER_ROLES = ("light", "bias", "dark", "flat")

#: Manifest columns, in order; numbers parse back as float (or int for the INT set).
COLUMNS = (
    "path", "folder", "role", "status", "reason", "error", "size", "mtime_ns", "ctime_ns", "hdu", "ny", "nx",
    "imagetyp_raw", "type_source", "is_master", "object", "filter", "exptime", "date_obs", "instrume", "gain",
    "offset", "readoutm", "set_temp", "xbinning", "ybinning", "pierside", "header_sha1", "table_sha1",
    "bayerpat",
)  # fmt: skip
_FLOAT = frozenset({"exptime", "gain", "offset", "set_temp", "dark_scale"})
_INT = frozenset(
    {"size", "mtime_ns", "ctime_ns", "hdu", "ny", "nx", "xbinning", "ybinning", "n_group", "n_frames"}
)
_BOOL = frozenset({"is_master", "thumb"})

#: Status values: ``ok`` (used), ``listed`` (left out on purpose), ``skipped`` (bad input);
#: a batch receipt item is also ``failed`` when making it raised an internal error.
OK, LISTED, SKIPPED, FAILED = "ok", "listed", "skipped", "failed"


def is_fits_name(name: str) -> bool:
    """True when ``name`` ends with one of :data:`FITS_SUFFIXES`, in any case (not hidden)."""
    lower = name.lower()
    return not lower.startswith(".") and lower.endswith(FITS_SUFFIXES)


def list_fits(folder: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """FITS files in ``folder`` and its subfolders, sorted by path (no header is read).

    Hidden files and folders are left out, and so are the folders ``exclude`` (an output folder
    inside the tree) and any subfolder holding :data:`OUTPUT_MARKER` (an imgproc output folder).
    Symlinks are followed, but each real folder is searched once (a symlink loop ends) and each
    file listed once: under its real path when the tree holds it, else under its first link in
    path order. A subfolder that cannot be read is left out. A folder, FIFO or dangling
    symlink with a FITS name is listed too (the scan skips it, saying what it is; a folder is
    also searched); :func:`watchable` tells the files Snakemake may watch.
    """
    searched = {_identity(path) for path in exclude if path.is_dir()}
    real, linked = [folder], []  # folders still to search: the real tree first, then the links
    files: list[Path] = []  # each real folder is searched once, so each of its files is new
    links: list[Path] = []  # symlinked files, listed when their file is not listed already
    while real or linked:
        current = real.pop() if real else linked.pop(0)
        try:
            key = _identity(current)
            if key in searched or (current != folder and (current / OUTPUT_MARKER).is_file()):
                continue
            searched.add(key)
            with os.scandir(current) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError:
            if current == folder:
                raise
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            named = is_fits_name(entry.name)
            if entry.is_dir():
                (linked if entry.is_symlink() else subfolders).append(Path(entry.path))
            if named and entry.is_symlink() and entry.is_file():
                links.append(Path(entry.path))
            elif named:  # a file, or a folder, FIFO or dangling link the scan reports
                files.append(Path(entry.path))
        real += reversed(subfolders)
    if links:
        seen = {_identity(path) for path in files}
        for link in sorted(links):
            if _identity(link) not in seen:
                seen.add(_identity(link))
                files.append(link)
    return sorted(files)


def watchable(path: Path) -> bool:
    """True for a regular file (symlinks followed) this process can read: Snakemake may take it
    as an input (it reads small inputs to record their checksums, so an unreadable one would
    fail every run with "Error recording metadata", and a FIFO would block it)."""
    return path.is_file() and os.access(path, os.R_OK)


def shown(path: str | Path) -> str:
    """A file name as messages print it: as it is, or repr-escaped when it holds a newline, a
    tab, another control character or bytes that are not UTF-8, so the message stays one line
    and names the real file."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def output_conflict(output: Path, input_dir: Path, master_dirs: Mapping[str, Path]) -> str:
    """Why ``output`` cannot be the output folder of these input folders, or ``""``: it may not
    be the input folder or inside it (outputs would be read as lights), nor a master folder
    (outputs would be read as calibration frames). Paths are compared resolved."""
    output, light = output.resolve(), input_dir.resolve()
    if output == light or light in output.parents:
        return f"output folder {output} is inside the input folder; choose another"
    for role, folder in sorted(master_dirs.items()):
        if output == folder.resolve():
            return f"output folder {output} is the {role} folder; choose another"
    return ""


def _identity(path: Path) -> tuple[int, int]:
    """(device, inode) of a file or folder, symlinks followed."""
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def describe_type(row: Mapping[str, Any]) -> str:
    """A row's frame type and where it came from: ``bias frame (IMAGETYP 'Bias Frame')``,
    ``flat frame (from its file name)``, ``bias frame (from its IRAFNAME)``."""
    kind, source = f"{row['role']} frame", row.get("type_source")
    if not source:
        return kind
    if row.get("imagetyp_raw") is not None:
        return f"{kind} ({source} {row['imagetyp_raw']!r})"
    return f"{kind} (from its {source})"


def same_filter(value: object, wanted: str) -> bool:
    """True when a light's filter ``value`` is the ``-f`` filter ``wanted``: compared as the
    file-name token both give (:func:`imgproc.naming.safe_part`), case-insensitively, so
    ``-f v`` takes ``V`` and ``-f "Sloan r"`` takes ``Sloan r'`` written as ``Sloan_r_``."""
    return safe_part(value, "").casefold().rstrip("_") == safe_part(wanted, "").casefold().rstrip("_") != ""


def filters_present(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The distinct filters of the readable lights of manifest ``rows``, sorted (``-`` for none)."""
    return sorted({str(row["filter"] or "-") for row in rows if _readable_light(row)})


def _readable_light(row: Mapping[str, Any]) -> bool:
    return row["folder"] == row["role"] == "light" and not row["error"]


def missing_filter(rows: Sequence[Mapping[str, Any]], wanted: str | None) -> str:
    """Why ``-f wanted`` selects nothing (naming the filters the lights have), or ``""``."""
    if wanted is None or any(_readable_light(row) and same_filter(row["filter"], wanted) for row in rows):
        return ""
    present = ", ".join(repr(name) for name in filters_present(rows)) or "none (no readable light)"
    return f"no light has the filter {wanted!r} (-f); the lights' filters: {present}"


def apply_policy(rows: list[dict], wanted_filter: str | None) -> list[dict]:
    """Statuses that depend on more than one file: non-lights in the input folder, frames of
    another type in a master folder, the ``-f`` filter, and the same frame present twice under
    two names.

    A folder given both as the input and as a master folder (one folder for a whole night, as
    some cameras and archives write it) is read by frame type: its untyped frames are the
    lights, and its frames of another type are listed, not used. In a master folder of its own,
    a frame of another type is skipped as a mistake.
    """
    lights = {row["path"] for row in rows if row["folder"] == "light"}
    seen: dict[str, str] = {}
    for row in rows:
        row.update(status=OK, reason="")
        shared = row["folder"] != "light" and row["path"] in lights
        if row["folder"] != "light" and not row.get("type_source"):
            row["role"] = "light" if shared else row["folder"]
        if row["error"]:
            row.update(status=SKIPPED, reason=row["error"])
        elif row["folder"] != "light" and row["role"] != row["folder"]:
            reason = f"{describe_type(row)} in the {row['folder']} folder"
            if shared:
                row.update(status=LISTED, reason=f"{reason}: listed, not used")
            else:
                row.update(status=SKIPPED, reason=reason)
        elif row["folder"] == "light" and row["role"] != "light":
            reason = f"{describe_type(row)} in the light folder: listed, not processed"
            row.update(status=LISTED, reason=reason)
        elif row["folder"] == "light" and wanted_filter and not same_filter(row["filter"], wanted_filter):
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
    return str(value)


def _field(text: str) -> str:
    """A TSV field, quoted as the csv module quotes (and reads back), and also when it holds a
    carriage return, which csv would leave bare (a file name may hold one)."""
    if any(char in text for char in '\t\n\r"'):
        return '"' + text.replace('"', '""') + '"'
    return text


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
    """Write rows as a tab-separated table (atomically: temporary file, then rename). Any file
    name is kept exactly: tabs, newlines and bytes that are not UTF-8 (as Python's
    surrogate escapes) included."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        handle.write("\t".join(map(_field, columns)) + "\n")
        for row in rows:
            handle.write("\t".join(_field(_format(row.get(column))) for column in columns) + "\n")
    os.replace(tmp, path)


def read_tsv(path: Path) -> list[dict[str, Any]]:
    """Read a table written by :func:`write_tsv`, with numbers and flags parsed back."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        return [{key: _parse(key, value) for key, value in row.items()} for row in reader]
