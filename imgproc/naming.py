"""Output names: ``<OBJECT>_<OBSERVER>_<FILTER>_<YYYYMMDD>_<JD>.fits`` from mid-exposure time."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta

from imgproc.keywords import is_placeholder

#: Julian Date of the Unix epoch (1970-01-01T00:00:00 UTC).
_JD_UNIX_EPOCH = 2440587.5
_EPOCH = datetime(1970, 1, 1)
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
#: Longest name part kept (a 300-character OBJECT must not make an unwritable file name).
MAX_PART = 64


#: What an observer code may hold: it goes into file names and the ASCII ``OBSERVER`` card as it is.
OBSERVER_CODE = re.compile(rf"[A-Za-z0-9_+-][A-Za-z0-9._+-]{{0,{MAX_PART - 1}}}")


def check_observer(code: str) -> str:
    """``code`` if it is a valid observer code (:data:`OBSERVER_CODE`), else ValueError saying why."""
    if not OBSERVER_CODE.fullmatch(code):
        raise ValueError(
            f"observer code {code!r} must be 1-{MAX_PART} characters of A-Z a-z 0-9 . _ + - "
            "(not starting with a dot): it goes into file names and the OBSERVER card"
        )
    return code


def safe_part(value: object, fallback: str = "UNKNOWN") -> str:
    """A file-name-safe token: spaces and characters outside ``[A-Za-z0-9._+-]`` become ``_``.

    Leading dots are dropped (no hidden files, no ``..``), the result is cut to
    :data:`MAX_PART` characters, and an empty or placeholder value gives ``fallback``.
    """
    if is_placeholder(value):
        return fallback
    text = _UNSAFE.sub("_", str(value).strip()).lstrip(".")[:MAX_PART]
    return text if text.strip("_.") else fallback


def mid_exposure(date_obs: datetime, exptime: float) -> datetime:
    """Mid-exposure time: DATE-OBS + EXPTIME/2 (what AAVSO reports)."""
    return date_obs + timedelta(seconds=exptime / 2.0)


def mean_time(times: Sequence[datetime]) -> datetime:
    """Mean of datetimes, exact to the microsecond (a stack's mean mid-exposure time)."""
    base = times[0]
    offsets = [(t - base) / timedelta(microseconds=1) for t in times]
    return base + timedelta(microseconds=round(sum(offsets) / len(offsets)))


def julian_date(when: datetime) -> float:
    """Julian Date (UTC) of a naive UTC datetime, exact to the microsecond."""
    delta = when - _EPOCH
    return _JD_UNIX_EPOCH + delta.days + (delta.seconds + delta.microseconds / 1e6) / 86400.0


def format_jd(jd: float) -> str:
    """The JD as written in names: 8 decimals (~1 ms)."""
    return f"{jd:.8f}"


def output_name(obj: object, observer: object, filt: object, mid: datetime) -> str:
    """Final file name of a frame or stack whose (mean) mid-exposure time is ``mid``."""
    parts = (
        safe_part(obj),
        safe_part(observer),
        safe_part(filt),
        mid.strftime("%Y%m%d"),
        format_jd(julian_date(mid)),
    )
    return "_".join(parts) + ".fits"


def default_output_dirname(obj: object, first_date_obs: datetime, observer: object) -> str:
    """The seed's default output folder name ``<OBJECT>_<YYYY-MM-DD>_<OBSERVER>_CAL``."""
    return f"{safe_part(obj)}_{first_date_obs:%Y-%m-%d}_{safe_part(observer)}_CAL"
