"""Master frames built from raw calibration frames: grouping (Maker's plan) and combining.

Raw bias, dark and flat frames given with ``-B``/``-D``/``-F`` are grouped by the keywords that
matching uses (bias: instrument, gain, offset, readout mode, set temperature, binning, shape;
darks also exposure; flats also filter).  A group of at least ``min_frames`` becomes a master,
unless a finished master in the same folder already covers it.  Darks are bias-subtracted when
a bias is available; flats are bias- and dark-corrected (without a dark of their exposure, the
longest bias-subtracted one scaled by the exposure ratio, when a bias is subtracted) and
normalised to mean 1 over the central region.  Each frame is combined by a sigma-clipped mean
(3σ, median centre, MAD width) in row strips under the memory budget.

This module is the planning, in pure Python (the Snakefile reads it at parse time);
:mod:`imgproc.masterbuild` does the combining.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from imgproc.manifest import OK
from imgproc.matching import DEFAULT_CRITERIA, DEFAULT_TOLERANCE, differences, match_dark, match_master
from imgproc.naming import mean_time, safe_part

ROLES = ("bias", "dark", "flat")
MASTER_DIR = Path("masters")
#: Columns of ``work/masters.tsv`` (a master's metadata uses the manifest's column names).
COLUMNS = (
    "path", "folder", "role", "status", "reason", "members", "members_id", "n_frames", "bias", "dark",
    "dark_scale", "is_master", "object", "filter", "exptime", "date_obs", "instrume", "gain", "offset",
    "readoutm", "set_temp", "xbinning", "ybinning", "ny", "nx",
)  # fmt: skip
_META = (
    "filter",
    "exptime",
    "instrume",
    "gain",
    "offset",
    "readoutm",
    "set_temp",
    "xbinning",
    "ybinning",
    "ny",
    "nx",
)
IMAGETYP = {"bias": "masterBIAS", "dark": "masterDARK", "flat": "masterFLAT"}


@dataclass(frozen=True)
class MasterSettings:
    """How raw calibration frames become masters."""

    min_frames: int = 3
    prefer_finished: bool = True  # a finished master of the same group wins over building one
    criteria: Mapping[str, Sequence[str]] = field(default_factory=lambda: dict(DEFAULT_CRITERIA))
    tolerance: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TOLERANCE))
    dark_scaling: bool = True  # a dark of another exposure, bias-subtracted, scaled to the flats'


def group_raw(rows: Sequence[Mapping[str, Any]], role: str, settings: MasterSettings) -> list[list[Mapping]]:
    """Raw frames of ``role`` in groups that agree on every matching keyword (within tolerance).

    Frames are taken in file-name order; each joins the first group whose first frame it
    agrees with, so the grouping is deterministic.
    """
    keys = list(settings.criteria[role])
    groups: list[list[Mapping[str, Any]]] = []
    for row in sorted(rows, key=lambda r: r["path"]):
        for group in groups:
            if not differences(group[0], row, keys, settings.tolerance):
                group.append(row)
                break
        else:
            groups.append([row])
    return groups


def master_name(role: str, members: Sequence[Mapping[str, Any]]) -> str:
    """File name of the master built from ``members``: readable, and unique per member set."""
    first = members[0]
    label = {
        "bias": "",
        "dark": f"_{first.get('exptime') or 0:g}s",
        "flat": f"_{safe_part(first.get('filter'))}",
    }
    digest = hashlib.sha1("\n".join(sorted(m["path"] for m in members)).encode()).hexdigest()[:8]
    return f"master_{role}{label[role]}_{digest}.fits"


def members_id(members: Sequence[Mapping[str, Any]]) -> str:
    """Digest of the raw frames' paths, sizes, modification and change times: a param of the
    master's build job, so a frame rewritten with its old size and modification time (which
    Snakemake does not see) rebuilds the master."""
    files = sorted([m["path"], m.get("size"), m.get("mtime_ns"), m.get("ctime_ns")] for m in members)
    return hashlib.sha1(repr(files).encode()).hexdigest()[:16]


def _as_master_row(role: str, members: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    first = members[0]
    dates = [datetime.fromisoformat(m["date_obs"]) for m in members if m.get("date_obs")]
    row: dict[str, Any] = {key: first.get(key) for key in _META}
    row.update(
        path=str(MASTER_DIR / master_name(role, members)), folder=role, role=role, is_master=True, status=OK,
        reason="", object=None, members=";".join(sorted(m["path"] for m in members)), n_frames=len(members),
        members_id=members_id(members),
        date_obs=mean_time(dates).isoformat(timespec="milliseconds") if dates else None,
    )  # fmt: skip
    return row


def plan_masters(rows: Sequence[Mapping[str, Any]], settings: MasterSettings) -> list[dict[str, Any]]:
    """Masters to build from the raw calibration frames of the manifest (and rejected groups).

    Returns rows with the manifest's metadata columns plus ``members``, ``bias``, ``dark`` and
    ``dark_scale`` (what the frames are corrected with); ``status`` is ``ok`` for a master to
    build and ``skipped`` (with ``reason``) for a group that will not be built.
    """
    finished = {
        r: [x for x in rows if x["folder"] == r and x["status"] == OK and x["is_master"]] for r in ROLES
    }
    raw = {
        r: [x for x in rows if x["folder"] == r and x["status"] == OK and not x["is_master"]] for r in ROLES
    }
    planned: list[dict[str, Any]] = []
    usable: dict[str, list[Mapping[str, Any]]] = {role: list(finished[role]) for role in ROLES}
    for role in ROLES:  # bias first: darks and flats are corrected with the masters before them
        for members in group_raw(raw[role], role, settings):
            master = _as_master_row(role, members)
            covering = match_master(master, finished[role], role, settings.criteria, settings.tolerance)
            if len(members) < settings.min_frames:
                master.update(status="skipped", reason=f"only {len(members)} raw {role} frames; "
                              f"at least {settings.min_frames} are needed")  # fmt: skip
            elif covering.path and settings.prefer_finished:
                master.update(
                    status="skipped", reason=f"finished master {Path(covering.path).name} covers this group"
                )
            else:
                _corrections(master, role, usable, settings)
                usable[role].append(master)
            planned.append(master)
    return planned


def _corrections(
    master: dict[str, Any], role: str, usable: Mapping[str, Sequence[Mapping]], settings: MasterSettings
) -> None:
    """Which bias (and dark, with its exposure scale) a dark or flat group is corrected with.

    A flat without a dark of its exposure is corrected with the longest bias-subtracted dark
    scaled by the exposure ratio (:func:`imgproc.matching.match_dark`), if a bias is subtracted
    too and ``dark_scaling`` is on; otherwise with no dark.
    """
    master.update(dark=None, dark_scale=None)
    if role == "bias":
        return
    bias = match_master(master, usable["bias"], "bias", settings.criteria, settings.tolerance)
    master["bias"] = bias.path
    if role != "flat":
        return
    dark = match_dark(master, usable["dark"], bias=bias.path is not None, scaling=settings.dark_scaling,
                      criteria=settings.criteria, tolerance=settings.tolerance)  # fmt: skip
    master.update(dark=dark.path, dark_scale=dark.scale)
