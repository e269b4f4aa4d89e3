"""Header keywords: the table of canonical names and the normalisation of raw header values.

Every camera-control program spells the same facts differently (EXPTIME or EXPOSURE, FILTER or
FILTER1, numbers written as strings, local times with a UTC offset).  ``normalise`` turns a raw
header into one flat dict of canonical names so that nothing downstream looks at raw cards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

#: Canonical name -> header keywords tried in order.  Overridable from config ``keywords``.
DEFAULT_KEYWORDS: dict[str, list[str]] = {
    "imagetyp": ["IMAGETYP", "FRAMETYP", "FRAME", "OBSTYPE"],
    "frame_name": ["IRAFNAME"],
    "object": ["OBJECT", "OBJNAME"],
    "filter": ["FILTER", "FILTER1", "FILTNAME"],
    "exptime": ["EXPTIME", "EXPOSURE"],
    "date_obs": ["DATE-OBS", "UT-OBS"],
    "instrume": ["INSTRUME"],
    "gain": ["GAIN"],
    "offset": ["OFFSET", "BLKLEVEL"],
    "readoutm": ["READOUTM"],
    "set_temp": ["SET-TEMP"],
    "xbinning": ["XBINNING"],
    "ybinning": ["YBINNING"],
    "pierside": ["PIERSIDE"],
    "bayerpat": ["BAYERPAT", "CFA-PAT", "COLORTYP"],
}

#: Canonical names whose values are numbers (strings such as '40' become floats).
NUMERIC = frozenset({"exptime", "gain", "offset", "set_temp", "xbinning", "ybinning"})

#: Colour filter array patterns (2×2 cells, row by row) a colour camera's frame may carry.
CFA_PATTERNS = frozenset({"RGGB", "GRBG", "GBRG", "BGGR"})

#: Values that mean "not recorded" in real archives (e.g. OBJECT='None').
PLACEHOLDERS = frozenset({"", "none", "null", "n/a", "unknown"})

#: Words of frame-type values, first match wins: ``'skyflat'`` and ``'twilight flat'`` are flats,
#: ``'darkflat'`` (a dark for flats) a dark.
_IMAGETYP_WORDS: list[tuple[str, str]] = [
    ("bias", "bias"),
    ("zero", "bias"),
    ("offset", "bias"),
    ("dark", "dark"),
    ("flat", "flat"),
    ("light", "light"),
    ("object", "light"),
    ("science", "light"),
    ("expose", "light"),
    ("standard", "light"),
    ("sky", "light"),
]

#: A word of a file name that names a calibration frame: ``bias``, ``zeros``, ``darks``,
#: ``skyflat``, ``masterFlat``... (a whole word between non-letters, never part of a longer one).
_NAME_WORD = re.compile(r"(?:master|sky|dome|lamp|twilight)?(bias|zero|dark|flat)(?:e?s)?")
_NAME_KINDS = {"bias": "bias", "zero": "bias", "dark": "dark", "flat": "flat"}

_TZ_SUFFIX = re.compile(r"(?P<base>.*?)(?P<tz>Z|[+-]\d{2}:?\d{2})$")


class HeaderError(ValueError):
    """A header value that cannot be understood."""


def is_placeholder(value: object) -> bool:
    """True for a missing value or a placeholder string such as ``'None'``."""
    return value is None or (isinstance(value, str) and value.strip().lower() in PLACEHOLDERS)


def frame_type(imagetyp: object) -> str | None:
    """Map an IMAGETYP-like value to ``light``/``bias``/``dark``/``flat`` (None if absent).

    ``'Light Frame'``, ``'LIGHT'``, ``'Object'``, ``'science'`` -> light; ``'Master Bias'``,
    ``'Bias Frame'``, ``'zero'`` -> bias; unknown words -> ``'other'``.
    """
    if is_placeholder(imagetyp):
        return None
    text = str(imagetyp).strip().lower()
    for word, kind in _IMAGETYP_WORDS:
        if word in text:
            return kind
    return "other"


def name_type(name: object) -> str | None:
    """The calibration type a file name (or IRAFNAME) names by a whole word, else None.

    ``'bias_1.fits'``, ``'flats01.fits'``, ``'calib-001-dark.fit'``, ``'zero_003'`` name a type;
    ``'IC310_1'``, ``'Light_NGC 7023'``, ``'darkcloud_01'`` and ``'flatiron'`` do not, and neither
    does a name with words of two types (``'flat_dark_1'``).
    """
    if is_placeholder(name):
        return None
    words = re.split(r"[^a-z]+", str(name).lower())
    kinds = {_NAME_KINDS[m.group(1)] for word in words if (m := _NAME_WORD.fullmatch(word))}
    return kinds.pop() if len(kinds) == 1 else None


def is_master_type(imagetyp: object) -> bool:
    """True when IMAGETYP marks a finished master (``'Master Dark'``, ``'masterFLAT'``...)."""
    return not is_placeholder(imagetyp) and str(imagetyp).strip().lower().startswith("master")


def to_number(value: object) -> float | None:
    """A header value as a finite float, or None (strings such as ``'40'`` are accepted)."""
    if is_placeholder(value) or isinstance(value, bool):
        return None
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def cfa_pattern(bayerpat: object, filter_name: object) -> str | None:
    """The colour filter array pattern of a frame (``'RGGB'``...), or None for a mono frame.

    From BAYERPAT (or the keywords the table lists for it) when it names a pattern; a DSLR
    program writes the pattern as FILTER (``FILTER='RGGB'``) and no BAYERPAT.
    """
    for value in (bayerpat, filter_name):
        text = "" if value is None else str(value).strip().upper()
        if text in CFA_PATTERNS:
            return text
    return None


def parse_date_obs(value: object, time_obs: object = None) -> datetime:
    """Parse DATE-OBS into a naive UTC datetime.

    Accepts ISO dates with or without a UTC-offset suffix (``2017-12-19T18:33:43.317-0700`` is
    local time 7 h behind UTC, so it becomes 2017-12-20T01:33:43.317), a trailing ``Z``, and a
    date-only DATE-OBS completed by TIME-OBS.
    """
    if is_placeholder(value):
        raise HeaderError("DATE-OBS is missing")
    text = str(value).strip().replace(" ", "T")
    if "T" not in text and not is_placeholder(time_obs):
        text = f"{text}T{str(time_obs).strip()}"
    offset = timedelta(0)
    match = _TZ_SUFFIX.match(text)
    if match and "T" in match.group("base"):
        text, tz = match.group("base"), match.group("tz")
        if tz != "Z":
            sign = -1 if tz[0] == "-" else 1
            digits = tz[1:].replace(":", "")
            offset = sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise HeaderError(f"DATE-OBS {value!r} is not an ISO date") from exc
    try:
        if parsed.tzinfo is not None:
            return parsed.astimezone(UTC).replace(tzinfo=None)
        return parsed - offset
    except OverflowError as exc:  # 9999-12-31T23:00:00-0500 is in the year 10000 in UTC
        raise HeaderError(f"DATE-OBS {value!r} is out of range (years 1 to 9999) in UTC") from exc


def lookup_key(header: Mapping[str, Any], keys: list[str]) -> tuple[str | None, Any]:
    """(keyword, value) of the first of ``keys`` present with a non-placeholder value, else (None, None)."""
    for key in keys:
        if key in header and not is_placeholder(header[key]):
            return key, header[key]
    return None, None


def normalise(
    header: Mapping[str, Any], table: Mapping[str, list[str]] | None = None, file_name: str | None = None
) -> dict:
    """Canonical values of a raw header, by the keyword table.

    Returns a dict with every canonical name of ``table`` (None where absent); numeric names are
    floats; ``imagetyp`` is mapped by :func:`frame_type` with the raw text kept in
    ``imagetyp_raw``; ``date_obs`` is an ISO UTC string (or None, with ``date_error`` saying why);
    binning defaults to 1. Without a frame-type keyword, ``imagetyp`` is what ``file_name`` or
    ``frame_name`` (IRAFNAME) names (:func:`name_type`), else a bias when EXPTIME is 0;
    ``type_source`` says where the type came from: its keyword, ``'file name'``, ``frame_name``'s
    keyword, ``'EXPTIME of 0'``, or None.
    """
    table = dict(DEFAULT_KEYWORDS if table is None else table)
    values: dict[str, Any] = {}
    used: dict[str, str | None] = {}
    for name, keys in table.items():
        used[name], raw = lookup_key(header, list(keys))
        if name in NUMERIC:
            values[name] = to_number(raw)
        elif raw is None:
            values[name] = None
        else:
            values[name] = str(raw).strip()
    values["bayerpat"] = cfa_pattern(values.get("bayerpat"), values.get("filter"))
    values["imagetyp_raw"] = values.get("imagetyp")
    values["imagetyp"] = frame_type(values["imagetyp_raw"])
    values["type_source"] = used.get("imagetyp") if values["imagetyp"] else None
    named = (("file name", file_name), (used.get("frame_name"), values.get("frame_name")))
    if values["imagetyp"] is None:
        for source, text in named:
            if kind := name_type(text):
                values.update(imagetyp=kind, type_source=source)
                break
    if values["imagetyp"] is None and values.get("exptime") == 0:  # no light is 0 s long
        values.update(imagetyp="bias", type_source="EXPTIME of 0")
    for axis in ("xbinning", "ybinning"):
        values[axis] = int(values.get(axis) or 1)
    values["date_error"] = None
    try:
        values["date_obs"] = parse_date_obs(values.get("date_obs"), header.get("TIME-OBS")).isoformat(
            timespec="milliseconds"
        )
    except HeaderError as exc:
        values["date_obs"] = None
        values["date_error"] = str(exc)
    return values
