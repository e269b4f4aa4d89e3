"""Choosing the master bias, dark and flat of each light from manifest rows.

Criteria (keywords per master type) -> candidates that agree on all of them -> the nearest in
time, ties broken by file name.  When none agrees, the reason names the nearest candidate and
the keywords that differ.

Dark scaling: when no dark has the frame's exposure but a longer one agrees on everything else,
the longest such dark is used, scaled by the exposure ratio (frame / dark), as WBPP and Siril
do. Only a bias-subtracted dark (dark current alone) scales with exposure, so this needs a bias.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

#: Keywords that must agree, per master type (binning and image shape always must too).
DEFAULT_CRITERIA: dict[str, list[str]] = {
    "bias": ["instrume", "gain", "offset", "readoutm", "set_temp"],
    "dark": ["instrume", "gain", "offset", "readoutm", "set_temp", "exptime"],
    "flat": ["instrume", "gain", "offset", "readoutm", "filter"],
}
#: Numeric tolerances (inclusive); other numbers must agree exactly, strings case-insensitively.
DEFAULT_TOLERANCE: dict[str, float] = {"set_temp": 0.5, "exptime": 0.01}
_ALWAYS = ("xbinning", "ybinning", "ny", "nx")
_LABELS = {"ny": "NAXIS2", "nx": "NAXIS1"}


@dataclass(frozen=True)
class Match:
    """The master chosen for one light and role, or why there is none."""

    role: str
    path: str | None
    reason: str = ""
    scale: float | None = None  # a dark of another exposure: frame exptime / dark exptime


def label(name: str) -> str:
    """Header-style label of a canonical name for messages (``set_temp`` -> ``SET-TEMP``)."""
    return _LABELS.get(name, name.upper().replace("_", "-"))


def _agree(name: str, a: Any, b: Any, tolerance: Mapping[str, float]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, int | float) and isinstance(b, int | float):
        # a hair of slack so that a tolerance is inclusive despite binary floats (120.01 - 120)
        return abs(float(a) - float(b)) <= tolerance.get(name, 0.0) + 1e-9
    return str(a).strip().casefold() == str(b).strip().casefold()


def differences(
    light: Mapping[str, Any], master: Mapping[str, Any], keys: Sequence[str], tolerance: Mapping[str, float]
) -> list[str]:
    """``KEY (light vs master)`` for every criterion on which the two frames disagree."""
    return [
        f"{label(key)} ({light.get(key)!s} vs {master.get(key)!s})"
        for key in (*keys, *_ALWAYS)
        if not _agree(key, light.get(key), master.get(key), tolerance)
    ]


def _seconds_apart(light: Mapping[str, Any], master: Mapping[str, Any]) -> float:
    if not light.get("date_obs") or not master.get("date_obs"):
        return float("inf")
    delta = datetime.fromisoformat(light["date_obs"]) - datetime.fromisoformat(master["date_obs"])
    return abs(delta.total_seconds())


def _rank(light: Mapping[str, Any], master: Mapping[str, Any]) -> tuple[float, str]:
    return (_seconds_apart(light, master), Path(master["path"]).name)


def match_master(
    light: Mapping[str, Any],
    candidates: Sequence[Mapping[str, Any]],
    role: str,
    criteria: Mapping[str, Sequence[str]] = DEFAULT_CRITERIA,
    tolerance: Mapping[str, float] = DEFAULT_TOLERANCE,
) -> Match:
    """The master of ``role`` for ``light`` among ``candidates`` (manifest rows of that role)."""
    keys = list(criteria[role])
    if not candidates:
        return Match(role, None, f"no {role} master in the {role} folder")
    scored = [(differences(light, master, keys, tolerance), master) for master in candidates]
    matching = [master for diffs, master in scored if not diffs]
    if matching:
        best = min(matching, key=lambda master: _rank(light, master))
        return Match(role, best["path"])
    diffs, nearest = min(scored, key=lambda item: (len(item[0]), *_rank(light, item[1])))
    return Match(
        role,
        None,
        f"no matching {role} master; nearest {Path(nearest['path']).name} differs in " + ", ".join(diffs),
    )


def _exposure(row: Mapping[str, Any]) -> float:
    value = row.get("exptime")
    return float(value) if isinstance(value, int | float) else 0.0


def match_dark(
    frame: Mapping[str, Any],
    candidates: Sequence[Mapping[str, Any]],
    *,
    bias: bool,
    scaling: bool = True,
    criteria: Mapping[str, Sequence[str]] = DEFAULT_CRITERIA,
    tolerance: Mapping[str, float] = DEFAULT_TOLERANCE,
) -> Match:
    """The dark of ``frame`` (a light or a flat): one of its exposure, else (with ``scaling``)
    the longest dark that agrees on everything but the exposure and is longer than the frame,
    scaled down by the exposure ratio.

    ``bias`` says whether the frame gets a bias subtracted: without one the dark carries the
    bias too, and scaling it would scale the bias, so no dark is scaled (the reason says so).
    A shorter dark is never scaled up: its noise and any offset in it (the UMD ST-8's 3 s
    darks sit 17 ADU above the bias) would grow by the ratio.
    """
    exact = match_master(frame, candidates, "dark", criteria, tolerance)
    keys = [key for key in criteria["dark"] if key != "exptime"]
    if exact.path is not None or not scaling or len(keys) == len(criteria["dark"]) or _exposure(frame) <= 0:
        return exact
    others = [
        dark for dark in candidates if _exposure(dark) > 0 and not differences(frame, dark, keys, tolerance)
    ]
    if not others:
        return exact
    longer = [dark for dark in others if _exposure(dark) > _exposure(frame)]
    if not longer:
        shorter = ", ".join(f"{x:g} s" for x in sorted({_exposure(dark) for dark in others}))
        return Match(
            "dark", None, f"{exact.reason}; a shorter dark ({shorter}) is not scaled up to "
            f"{_exposure(frame):g} s",
        )  # fmt: skip
    usable = [dark for dark in longer if bias and _bias_free(dark)]
    if not usable:
        longest = min(longer, key=lambda dark: _longest_first(frame, dark))
        return Match(
            "dark", None, f"{exact.reason}; scaling {Path(longest['path']).name} to {_exposure(frame):g} s "
            "needs a bias master (a dark without one carries the bias)",
        )  # fmt: skip
    best = min(usable, key=lambda dark: _longest_first(frame, dark))
    return Match("dark", best["path"], scale=_exposure(frame) / _exposure(best))


def _longest_first(frame: Mapping[str, Any], dark: Mapping[str, Any]) -> tuple[float, float, str]:
    return (-_exposure(dark), *_rank(frame, dark))


def _bias_free(dark: Mapping[str, Any]) -> bool:
    """Whether a dark master holds dark current alone: one built here from raw frames says so
    by its ``bias`` column; a finished one is, by convention, when a bias folder is given."""
    return not dark.get("members") or bool(dark.get("bias"))


def match_light(
    light: Mapping[str, Any],
    masters: Mapping[str, Sequence[Mapping[str, Any]]],
    criteria: Mapping[str, Sequence[str]] = DEFAULT_CRITERIA,
    tolerance: Mapping[str, float] = DEFAULT_TOLERANCE,
    dark_scaling: bool = True,
) -> dict[str, Match]:
    """Matches for every role whose folder was given (``masters`` maps role -> candidate rows);
    the dark may be one of another exposure, scaled (:func:`match_dark`)."""
    matches = {role: match_master(light, rows, role, criteria, tolerance) for role, rows in masters.items()}
    if "dark" in masters:
        bias = "bias" in matches and matches["bias"].path is not None
        matches["dark"] = match_dark(
            light, masters["dark"], bias=bias, scaling=dark_scaling, criteria=criteria, tolerance=tolerance
        )
    return matches
