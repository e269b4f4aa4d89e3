"""Time and airmass cards that EXOTIC and AstroImageJ read right, for single frames and stacks.

Every output carries one consistent UTC time set: ``DATE-OBS`` and ``MJD-OBS`` are the
mid-exposure time less half of ``EXPTIME`` (comments with "start"), ``DATE-AVG``/``MJD-AVG``
the mid-exposure (a stack: the mean of its frames' mids), ``DATE-BEG``/``DATE-END`` the first
start and last end, ``TIMESYS = 'UTC'``. Camera time cards that EXOTIC or AstroImageJ would
read instead (``UT-OBS``, ``JD``, ``TIME-OBS``, ``TELAPSE``...) are removed, their values kept in
HISTORY. ``AIRMASS`` is sec z at mid-exposure (a stack: the mean over its frames), from the
target's coordinates and the site in the header, by ERFA's ``atco13`` (astropy's own engine:
ICRS to observed, without refraction; UT1 taken as UTC).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import erfa
import numpy as np
from astropy.io import fits

from imgproc.keywords import is_placeholder, lookup_key, to_number
from imgproc.naming import mean_time

#: Part of the calibration stamp: intermediates made before these cards are made again.
VERSION = 1
_MJD_EPOCH = datetime(1858, 11, 17)
#: Camera time cards that EXOTIC or AstroImageJ would read before (or instead of) ours, or that
#: would contradict them: removed, their values kept in HISTORY. ``DATE-LOC`` (local) may stay.
CONFLICTING = (
    "UT-OBS", "UT", "UTSTART", "UT-START", "UTC-OBS", "UT-END", "TIME-OBS", "TIME-BEG", "TIME-END",
    "JD", "JD-OBS", "JD-MID", "JULIAN", "MJD", "EXPSTART", "EXPEND",
    "JD-HELIO", "HJD", "BJD", "BJD_TDB", "BJD_TBD", "TELAPSE",
)  # fmt: skip
_HISTORY = "imgproc replaced"
_SITE_LAT = ["SITELAT", "LAT-OBS", "OBSLAT", "LATITUDE", "LAT"]
_SITE_LON = ["SITELONG", "LONG-OBS", "OBSLONG", "LONGITUD", "LONG"]
_SITE_ELEV = ["SITEELEV", "ELEV-OBS", "ALT-OBS", "OBSELEV", "ELEVATIO"]
_SPLIT = re.compile(r"[\s:hdms°'\"]+")


@dataclass(frozen=True)
class Site:
    """An observing site: geodetic latitude and east-positive longitude (degrees), height (m)."""

    lat: float
    lon: float
    height: float = 0.0


@dataclass(frozen=True)
class Target:
    """ICRS (J2000) coordinates of the field, degrees."""

    ra: float
    dec: float


def parse_angle(value: object, sexagesimal_hours: bool = False, number_hours: bool = False) -> float | None:
    """An angle in degrees from a header value, or None.

    Numbers and numeric strings are degrees (hours with ``number_hours``); sexagesimal strings
    (``'-76 02 39'``, ``'19:59:41.97'``, ``'+03 48 14'``) are degrees, or hours with
    ``sexagesimal_hours``. The sign of the first field applies to the whole angle.
    """
    if is_placeholder(value) or isinstance(value, bool):
        return None
    number = to_number(value)
    if number is not None:
        return number * 15.0 if number_hours else number
    text = str(value).strip()
    fields = [f for f in _SPLIT.split(text) if f]
    if not 2 <= len(fields) <= 3:
        return None
    try:
        parts = [abs(float(f)) for f in fields]
    except ValueError:
        return None
    if any(not math.isfinite(p) for p in parts) or any(p >= 60 for p in parts[1:]):
        return None
    magnitude = sum(p / 60.0**i for i, p in enumerate(parts))
    signed = -magnitude if text.startswith("-") else magnitude
    return signed * 15.0 if sexagesimal_hours else signed


def parse_site(header: Mapping[str, Any]) -> Site | None:
    """The observing site from a header, or None when it is not there.

    Tried in order: ``SITELAT``/``SITELONG``/``SITEELEV`` (MaxIm, N.I.N.A., INDI),
    ``LAT-OBS``/``LONG-OBS``/``ELEV-OBS`` and the other spellings, then ``OBSGEO-B/L/H`` and
    ``OBSGEO-X/Y/Z`` (geocentric metres). Longitudes are east-positive (MaxIm's
    ``SITELONG = '-76 02 39'`` is west of Greenwich); numbers or sexagesimal strings.
    """
    lat = parse_angle(lookup_key(header, _SITE_LAT)[1])
    lon = parse_angle(lookup_key(header, _SITE_LON)[1])
    height = to_number(lookup_key(header, _SITE_ELEV)[1])
    if lat is None or lon is None:
        lat, lon = to_number(header.get("OBSGEO-B")), to_number(header.get("OBSGEO-L"))
        height = to_number(header.get("OBSGEO-H"))
    if lat is None or lon is None:
        xyz = [to_number(header.get(f"OBSGEO-{axis}")) for axis in "XYZ"]
        if any(v is None for v in xyz) or math.hypot(*xyz) < 6.0e6:  # type: ignore[arg-type]
            return None
        elong, phi, height = erfa.gc2gd(1, np.array(xyz, dtype=float))  # WGS84
        lat, lon = math.degrees(phi), math.degrees(elong)
    if not -90.0 <= lat <= 90.0 or not -360.0 <= lon <= 360.0:
        return None
    lon = (lon + 180.0) % 360.0 - 180.0
    return Site(float(lat), float(lon), float(height or 0.0))


def parse_target(header: Mapping[str, Any]) -> Target | None:
    """The field's coordinates from a header, or None.

    The WCS reference point first (``CRVAL1/2`` with ``CTYPE1 = 'RA--...'``, a solved position),
    then ``RA``/``DEC`` (degrees as numbers, hours as sexagesimal strings), then
    ``OBJCTRA``/``OBJCTDEC`` (MaxIm, INDI: sexagesimal hours and degrees), then PANOPTES's
    ``RA-MNT``/``DEC-MNT`` (degrees). Taken as ICRS/J2000.
    """
    candidates = []
    if str(header.get("CTYPE1", "")).startswith("RA") and str(header.get("CTYPE2", "")).startswith("DEC"):
        candidates.append((to_number(header.get("CRVAL1")), to_number(header.get("CRVAL2"))))
    candidates.append((parse_angle(header.get("RA"), sexagesimal_hours=True), parse_angle(header.get("DEC"))))
    candidates.append((parse_angle(header.get("OBJCTRA"), True, True), parse_angle(header.get("OBJCTDEC"))))
    candidates.append((to_number(header.get("RA-MNT")), to_number(header.get("DEC-MNT"))))
    for ra, dec in candidates:
        if ra is not None and dec is not None and -90.0 <= dec <= 90.0:
            return Target(ra % 360.0, dec)
    return None


def airmass_problem(header: Mapping[str, Any]) -> str:
    """Why AIRMASS cannot be computed from a header ('' when it can)."""
    missing = [
        what
        for what, known in (
            ("target coordinates (RA/DEC, OBJCTRA/OBJCTDEC, RA-MNT/DEC-MNT or a WCS)", parse_target(header)),
            ("observing site (SITELAT/SITELONG, LAT-OBS/LONG-OBS or OBSGEO-*)", parse_site(header)),
        )
        if known is None
    ]
    return f"no {' and no '.join(missing)} in the header" if missing else ""


def mjd(when: datetime) -> float:
    """Modified Julian Date of a naive UTC datetime (about 1 µs resolution)."""
    return (when - _MJD_EPOCH) / timedelta(days=1)


def airmass(mids: Sequence[datetime], site: Site, target: Target) -> np.ndarray:
    """sec z of ``target`` seen from ``site`` at each UTC time of ``mids`` (NaN below the horizon).

    One vectorised call of ERFA's ``atco13`` (ICRS to observed: precession-nutation, annual
    aberration, light deflection, Earth rotation), without refraction and with UT1 = UTC (an
    error below 1 s of time, < 0.001 in airmass above 20° altitude); about 0.1 ms a time.
    """
    times = np.array([mjd(t) for t in mids])
    zenith = erfa.atco13(
        math.radians(target.ra), math.radians(target.dec), 0.0, 0.0, 0.0, 0.0,
        2400000.5, times, 0.0, math.radians(site.lon), math.radians(site.lat), site.height,
        0.0, 0.0, 0.0, 0.0, 0.0, 0.55,
    )[1]  # fmt: skip
    return np.where(zenith < math.pi / 2, 1.0 / np.cos(zenith), np.nan)


def header_airmass(header: Mapping[str, Any], mids: Sequence[datetime]) -> float | None:
    """Mean airmass over ``mids`` of the target and site of ``header`` (None if unknown or the
    target is below the horizon)."""
    site, target = parse_site(header), parse_target(header)
    if site is None or target is None:
        return None
    value = float(np.mean(airmass(mids, site, target)))
    return value if math.isfinite(value) else None


def mean_card_airmass(headers: Sequence[Mapping[str, Any]]) -> float | None:
    """Mean of the frames' own AIRMASS cards when every frame has a plausible one (1 to 40),
    else None: a stack's airmass when it cannot be computed."""
    values = [to_number(header.get("AIRMASS")) for header in headers]
    if any(v is None or not 1.0 <= v <= 40.0 for v in values):
        return None
    return float(np.mean(values))


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds")


def time_cards(frames: Sequence[tuple[datetime, float]]) -> dict[str, tuple[Any, str]]:
    """The UTC time cards (keyword -> (value, comment)) of an output made from ``frames``,
    each a (start, exposure in s) pair in UTC; the first frame's exposure is the EXPTIME."""
    exptime = float(frames[0][1])
    mid = mean_time([start + timedelta(seconds=exp / 2.0) for start, exp in frames])
    start = mid - timedelta(seconds=exptime / 2.0)
    first, last = min(s for s, _ in frames), max(s + timedelta(seconds=e) for s, e in frames)
    mean = "mean " if len(frames) > 1 else ""
    return {
        "DATE-OBS": (_iso(start), f"[UTC] start = {mean}mid - EXPTIME/2"),
        "MJD-OBS": (mjd(start), f"[d] UTC start = {mean}mid - EXPTIME/2"),
        "DATE-BEG": (_iso(first), "[UTC] start of the first exposure"),
        "MJD-BEG": (mjd(first), "[d] UTC start of the first exposure"),
        "DATE-END": (_iso(last), "[UTC] end of the last exposure"),
        "MJD-END": (mjd(last), "[d] UTC end of the last exposure"),
        "DATE-AVG": (_iso(mid), f"[UTC] {mean}mid-exposure"),
        "MJD-AVG": (mjd(mid), f"[d] UTC {mean}mid-exposure"),
        "TIMESYS": ("UTC", "time scale of the DATE and MJD cards"),
    }


def apply_time_cards(
    header: fits.Header,
    frames: Sequence[tuple[datetime, float]],
    airmass_value: float | None,
    *,
    history: bool = True,
) -> fits.Header:
    """Write :func:`time_cards` of ``frames`` and ``AIRMASS`` (when known) into ``header`` (in
    place, returned): conflicting camera time cards are removed and every replaced or removed
    value is kept in HISTORY (a replaced DATE-OBS, TIMESYS or AIRMASS only with ``history``:
    not for a header imgproc already wrote them in). EXPTIME is set, as a number, when it is
    missing or a string."""
    cards = time_cards(frames)
    for key in CONFLICTING:
        if key in header:
            header.add_history(f"{_HISTORY} {key} = {header[key]!r}")
            header.remove(key, remove_all=True)
    for key in ("DATE-OBS", "TIMESYS"):
        if history and key in header and str(header[key]).strip() != cards[key][0]:
            header.add_history(f"{_HISTORY} {key} = {header[key]!r}")
    exptime = header.get("EXPTIME")
    if isinstance(exptime, bool) or not isinstance(exptime, int | float):  # missing, or TIRCAM2's '40'
        if "EXPTIME" in header:
            header.add_history(f"{_HISTORY} EXPTIME = {exptime!r}")
        header.set(
            "EXPTIME", float(frames[0][1]), header.comments["EXPTIME"] if "EXPTIME" in header else "[s]"
        )
    for key, (value, comment) in cards.items():
        header.set(key, value, comment)
    if airmass_value is not None:
        old = to_number(header.get("AIRMASS"))
        if history and "AIRMASS" in header and (old is None or abs(old - airmass_value) > 5e-4):
            header.add_history(f"{_HISTORY} AIRMASS = {header['AIRMASS']!r}")
        what = "mean sec z of the frames" if len(frames) > 1 else "sec z at mid-exposure"
        header.set("AIRMASS", round(airmass_value, 6), f"{what}, no refraction")
    return header


def kept_history(header: fits.Header) -> list[str]:
    """The HISTORY lines of ``header`` that :func:`apply_time_cards` wrote."""
    return [str(line) for line in header.get("HISTORY", []) if str(line).startswith(_HISTORY)]
