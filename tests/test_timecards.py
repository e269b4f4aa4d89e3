"""Issue 19: the times and airmass EXOTIC and AstroImageJ read from imgproc's outputs.

The two clients' reading rules are re-implemented as the issue quotes them (EXOTIC 4.3.1
``img_time_bjd_tdb``/``exp_offset``, AstroImageJ ``FitsJ.getJD``/``getMeanJD``/``getExposureTime``),
and applied to single, aligned and stacked outputs of a generated night whose lights are written
in five header dialects. The truth is the generator's own start times and astropy's full AltAz
transform (no refraction).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import AltAz, EarthLocation, SkyCoord
from astropy.io import fits
from astropy.time import Time
from astropy.utils import iers
from conftest import fitsverify_errors, run_cli

from imgproc.cli import EXIT_OK
from imgproc.plan import calibration_notes
from imgproc.stages import airmass_gaps
from imgproc.synth import NightSpec, make_night
from imgproc.timecards import (
    CONFLICTING,
    Site,
    Target,
    airmass_problem,
    apply_time_cards,
    mean_card_airmass,
    parse_angle,
    parse_site,
    parse_target,
)

LAT, LON, HEIGHT = 31.68, -110.6, 2000.0  # a site west of Greenwich: the longitude's sign matters
RA0, DEC0 = 307.5, 40.5  # the synthetic field's centre (imgproc.synth)
SPEC = NightSpec(
    n_lights=11, shape=(60, 74), filters=("V",), n_stars=25, dither_px=2.0, distractors=False,
    start="2025-05-01T11:15:00", exptime=60.0, cadence_s=75.0,
)  # fmt: skip
DIALECTS = ("maxim", "nina", "indi", "local-offset", "date-time-obs")
_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?")


# --- the clients' reading rules, as quoted in issue 19 ----------------------------------------


def exotic_mid_jd(header: fits.Header) -> float:
    """EXOTIC: the first of BJD_TDB, BJD_TBD, BJD; else the first of UT-OBS, JULIAN, MJD-OBS,
    DATE-OBS (+TIME-OBS), plus EXPTIME/2 only when that keyword's comment contains "start"."""
    for key in ("BJD_TDB", "BJD_TBD", "BJD"):
        if key in header:
            return float(header[key])
    key = next(k for k in ("UT-OBS", "JULIAN", "MJD-OBS", "DATE-OBS") if k in header)
    if key == "JULIAN":
        jd = float(header[key])
    elif key == "MJD-OBS":
        jd = float(header[key]) + 2400000.5
    else:
        text = str(header[key])
        if "T" not in text and "TIME-OBS" in header:
            text = f"{text}T{header['TIME-OBS']}"
        jd = Time(text, format="isot", scale="utc").jd
    if "start" in header.comments[key]:
        jd += float(header["EXPTIME"]) / 2.0 / 86400.0
    return jd


def aij_mid_jd(header: fits.Header) -> float:
    """AstroImageJ: DATE-OBS (+TIME-OBS) when it parses (no zone suffix), else JD-OBS, JD, MJD-OBS,
    MJD; mid = start + exposure/2, the exposure being TELAPSE, else EXPTIME."""
    text = str(header.get("DATE-OBS", ""))
    if "T" not in text and "TIME-OBS" in header:
        text = f"{text}T{header['TIME-OBS']}"
    if _ISO.fullmatch(text):
        start = Time(text, format="isot", scale="utc").jd
    else:
        key = next(k for k in ("JD-OBS", "JD", "MJD-OBS", "MJD") if k in header)
        start = float(header[key]) + (2400000.5 if key.startswith("MJD") else 0.0)
    exposure = float(header["TELAPSE"] if "TELAPSE" in header else header["EXPTIME"])
    return start + exposure / 2.0 / 86400.0


def name_jd(path: Path) -> float:
    """The JD in an output's name (``..._<JD>.fits``)."""
    return float(path.name.rsplit("_", 1)[1].removesuffix(".fits"))


# --- a generated night in five dialects -----------------------------------------------------


def _sexagesimal(degrees: float, hours: bool = False) -> str:
    value = abs(degrees) / (15.0 if hours else 1.0)
    d, rest = divmod(value * 3600.0, 3600.0)
    m, s = divmod(rest, 60.0)
    sign = "-" if degrees < 0 else ("" if hours else "+")
    return f"{sign}{int(d):02d} {int(m):02d} {s:05.2f}"


def _dialect(header: fits.Header, dialect: str) -> None:
    """Rewrite a synthetic light's time, target and site cards the way ``dialect`` writes them."""
    start = datetime.fromisoformat(header["DATE-OBS"])
    geo = EarthLocation.from_geodetic(LON * u.deg, LAT * u.deg, HEIGHT * u.m)
    if dialect == "maxim":  # sexagesimal strings, JD of the start, no WCS, no RA/DEC
        for key in [k for k in header if k[:5] in ("CTYPE", "CRVAL", "CRPIX", "CUNIT") or k[:2] == "CD"]:
            del header[key]
        del header["RA"], header["DEC"]
        header["OBJCTRA"], header["OBJCTDEC"] = _sexagesimal(RA0, hours=True), _sexagesimal(DEC0)
        header["SITELAT"], header["SITELONG"] = _sexagesimal(LAT), _sexagesimal(LON)
        header["JD"] = (Time(start).jd, "Julian Date at start of exposure")
        header["AIRMASS"] = (1.5, "Relative optical path length")
        header.comments["DATE-OBS"] = "YYYY-MM-DDThh:mm:ss observation start, UT"
    elif dialect == "nina":  # decimal degrees, microseconds, local time too
        header["DATE-OBS"] = (start.isoformat(timespec="microseconds"), "Start of exposure (UTC)")
        header["DATE-LOC"] = ((start - timedelta(hours=7)).isoformat(), "Time of observation (local)")
        header["SITELAT"], header["SITELONG"], header["SITEELEV"] = LAT, LON, HEIGHT
    elif dialect == "indi":  # sexagesimal RA/DEC strings, geodetic OBSGEO
        header["OBJCTRA"], header["OBJCTDEC"] = _sexagesimal(RA0, hours=True), _sexagesimal(DEC0)
        header["OBSGEO-B"], header["OBSGEO-L"], header["OBSGEO-H"] = LAT, LON, HEIGHT
    elif dialect == "local-offset":  # MicroObservatory: local time with its UTC offset, UT-OBS
        local = start - timedelta(hours=7)
        header["DATE-OBS"] = local.isoformat(timespec="milliseconds") + "-0700"
        header["UT-OBS"] = (start.strftime("%H:%M:%S"), "UT of start")
        header["JD-OBS"] = round(Time(start).jd, 3)
        header["OBSGEO-X"], header["OBSGEO-Y"], header["OBSGEO-Z"] = (
            float(v.to_value(u.m)) for v in geo.geocentric
        )
    else:  # date-only DATE-OBS + TIME-OBS, LAT-OBS/LONG-OBS, a TELAPSE AstroImageJ would read
        header["DATE-OBS"], header["TIME-OBS"] = (
            start.strftime("%Y-%m-%d"),
            start.strftime("%H:%M:%S.%f")[:-3],
        )
        header["LAT-OBS"], header["LONG-OBS"], header["ELEV-OBS"] = LAT, LON, HEIGHT
        header["TELAPSE"] = 65.0


@pytest.fixture(scope="module")
def dialect_night(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, datetime]]:
    """The lights folder of an 11-light night, light k in dialect k % 5, and each light's true
    mid-exposure time."""
    night = make_night(tmp_path_factory.mktemp("dialects"), SPEC)
    mids = {}
    for k, path in enumerate(night.lights):
        with fits.open(path, mode="update") as hdul:
            mids[path.name] = datetime.fromisoformat(hdul[0].header["DATE-OBS"]) + timedelta(seconds=30)
            _dialect(hdul[0].header, DIALECTS[k % len(DIALECTS)])
    return night.root / "lights", mids


def true_airmass(mids: list[datetime]) -> float:
    """Mean sec z by astropy's full AltAz transform (no refraction)."""
    iers.conf.auto_download = False
    site = EarthLocation.from_geodetic(LON * u.deg, LAT * u.deg, HEIGHT * u.m)
    frame = AltAz(obstime=Time(mids, scale="utc"), location=site, pressure=0 * u.hPa)
    return float(np.mean(SkyCoord(RA0 * u.deg, DEC0 * u.deg).transform_to(frame).secz))


def check_outputs(out: Path, mids: dict[str, datetime]) -> dict[str, int]:
    """Assert both clients read every output's true mid-exposure (10 ms) and airmass (0.001);
    returns the outputs' kinds counted."""
    kinds = {"single": 0, "aligned": 0, "stack": 0}
    unmatched = dict(mids)
    for path in sorted(out.glob("*.fits")):
        header = fits.getheader(path)
        history = " ".join(str(line) for line in header.get("HISTORY", []))
        inputs = [name for name in mids if f"input {name} " in history]
        if not inputs:  # a single frame: the light whose mid it reads
            mid_jd = exotic_mid_jd(header)
            inputs = [min(unmatched, key=lambda n: abs(Time(unmatched[n]).jd - mid_jd))]
        for name in inputs:
            del unmatched[name]
        kinds["stack" if len(inputs) > 1 else "aligned" if "ALIGNDX" in header else "single"] += 1
        truth = Time([mids[n] for n in inputs], scale="utc").jd.mean()
        for rule in (exotic_mid_jd, aij_mid_jd):
            assert abs(rule(header) - truth) * 86400 < 0.010, (path.name, rule.__name__, inputs)
        assert abs(name_jd(path) - truth) * 86400 < 0.002
        assert header["AIRMASS"] == pytest.approx(true_airmass([mids[n] for n in inputs]), abs=0.001)
        assert 1.0 < header["AIRMASS"] < 3.0  # the field is well up: a wrong sign would not be
        assert header["TIMESYS"] == "UTC" and "start" in header.comments["DATE-OBS"]
        assert not any(key in header for key in CONFLICTING)
        assert header["EXPTIME"] == 60.0 and header.get("NCOMBINE", 1) == len(inputs)
        starts = sorted(mids[n] - timedelta(seconds=30) for n in inputs)
        assert header["DATE-BEG"] == starts[0].isoformat(timespec="milliseconds")
        assert header["DATE-END"] == (starts[-1] + timedelta(seconds=60)).isoformat(timespec="milliseconds")
    assert not unmatched
    return kinds


@pytest.fixture(scope="module")
def single_out(dialect_night, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The night's outputs as single calibrated frames (hard links of the intermediates)."""
    out = tmp_path_factory.mktemp("single") / "out"
    assert run_cli(dialect_night[0], out) == EXIT_OK
    return out


@pytest.fixture(scope="module")
def stacked_out(dialect_night, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """11 lights, ``-a -s -S 5``: pairs (their first frames in all five dialects) and one aligned
    single."""
    out = tmp_path_factory.mktemp("stacked") / "out"
    assert run_cli(dialect_night[0], out, "-a", "-s", "-S", "5") == EXIT_OK
    return out


def test_single_frames_read_right_in_every_dialect(dialect_night, single_out: Path) -> None:
    assert check_outputs(single_out, dialect_night[1]) == {"single": 11, "aligned": 0, "stack": 0}
    summary = json.loads((single_out / "summary.json").read_text())
    assert summary["no_airmass"] == {} and "AIRMASS" not in (single_out / "summary.txt").read_text()
    # the camera's values are kept in HISTORY: MaxIm's JD and AIRMASS, the local DATE-OBS...
    headers = [fits.getheader(p) for p in single_out.glob("*.fits")]
    history = " ".join(str(line) for h in headers for line in h["HISTORY"])
    for kept in (
        "JD = 24",
        "AIRMASS = 1.5",
        "DATE-OBS = '2025-05-01T04:",
        "TIME-OBS = ",
        "UT-OBS = ",
        "TELAPSE",
    ):
        assert f"imgproc replaced {kept}" in history, kept
    assert sum("DATE-LOC" in h for h in headers) == 2  # N.I.N.A.'s local time may stay


def test_aligned_frames_and_stacks_read_right(dialect_night, stacked_out: Path) -> None:
    assert check_outputs(stacked_out, dialect_night[1]) == {"single": 0, "aligned": 1, "stack": 5}
    history = [str(line) for line in fits.getheader(min(stacked_out.glob("*.fits")))["HISTORY"]]
    assert any(line.startswith("imgproc replaced") for line in history)  # the first frame's, kept


@pytest.mark.parametrize("outputs", ["single_out", "stacked_out"])
def test_outputs_pass_fitsverify(outputs: str, request: pytest.FixtureRequest) -> None:
    """fitsverify finds no error in any output (skipped where it is not installed, except in CI)."""
    for path in sorted(request.getfixturevalue(outputs).glob("*.fits")):
        assert fitsverify_errors(path) == ""


# --- parsing and the summary note -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kwargs", "degrees"),
    [
        ("-76 02 39", {}, -(76 + 2 / 60 + 39 / 3600)),
        ("+03 48 14", {}, 3 + 48 / 60 + 14 / 3600),
        ("-00 30 00", {}, -0.5),
        ("19:59:41.97", {"sexagesimal_hours": True}, 15 * (19 + 59 / 60 + 41.97 / 3600)),
        ("01 24 11", {"sexagesimal_hours": True, "number_hours": True}, 15 * (1 + 24 / 60 + 11 / 3600)),
        (315.499995, {"sexagesimal_hours": True}, 315.499995),
        ("32.8965", {}, 32.8965),
        ("1.5", {"number_hours": True}, 22.5),
        ("", {}, None),
        ("E", {}, None),
        ("12 75 00", {}, None),
    ],
)
def test_parse_angle(value, kwargs, degrees) -> None:
    got = parse_angle(value, **kwargs)
    assert got == pytest.approx(degrees) if degrees is not None else got is None


def test_site_and_target_of_the_real_dialects() -> None:
    maxim = {"SITELAT": "39 00 07", "SITELONG": "-76 02 39", "OBJCTRA": "01 24 11", "OBJCTDEC": "+03 48 14"}
    assert parse_site(maxim) == Site(pytest.approx(39.0019, abs=1e-4), pytest.approx(-76.0442, abs=1e-4), 0.0)
    assert parse_target(maxim) == Target(pytest.approx(21.0458, abs=1e-4), pytest.approx(3.8039, abs=1e-4))
    seestar = {"SITELAT": 32.8965, "SITELONG": -79.7625, "RA": 315.499995, "DEC": 68.215556,
               "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 315.44, "CRVAL2": 68.2}  # fmt: skip
    assert parse_site(seestar) == Site(32.8965, -79.7625, 0.0)
    assert parse_target(seestar) == Target(315.44, 68.2)  # the solved WCS first
    assert parse_target({"RA-MNT": 301.56439, "DEC-MNT": 44.456875}) == Target(301.56439, 44.456875)
    panoptes = {"LAT-OBS": "", "LONG-OBS": "", "ELEV-OBS": "", "RA-MNT": ""}
    assert parse_site(panoptes) is None
    assert airmass_problem(panoptes) == (
        "no target coordinates (RA/DEC, OBJCTRA/OBJCTDEC, RA-MNT/DEC-MNT or a WCS) and no observing site "
        "(SITELAT/SITELONG, LAT-OBS/LONG-OBS or OBSGEO-*) in the header"
    )
    assert airmass_problem(maxim) == ""
    assert parse_site({"SITELAT": 95.0, "SITELONG": 10.0}) is None


def test_exptime_becomes_a_number() -> None:
    """TIRCAM2 writes EXPTIME = '40' (a string): AstroImageJ needs a number."""
    header = fits.Header({"EXPTIME": "40", "DATE-OBS": "2022-10-23T08:33:25.000"})
    apply_time_cards(header, [(datetime(2022, 10, 23, 8, 33, 25), 40.0)], None)
    assert header["EXPTIME"] == 40.0 and "imgproc replaced EXPTIME = '40'" in str(header["HISTORY"])
    assert header["DATE-OBS"] == "2022-10-23T08:33:25.000" and "HISTORY" in header
    assert "AIRMASS" not in header and header["MJD-AVG"] == pytest.approx(59875.356771, abs=1e-6)


def test_a_stack_without_site_averages_its_frames_airmass_cards() -> None:
    assert mean_card_airmass([{"AIRMASS": 1.2}, {"AIRMASS": "1.4"}]) == pytest.approx(1.3)
    assert mean_card_airmass([{"AIRMASS": 1.2}, {}]) is None
    assert mean_card_airmass([{"AIRMASS": "99.99"}]) is None  # TIRCAM2's placeholder


def test_summary_says_once_why_airmass_is_missing() -> None:
    why = airmass_problem({"RA": 10.0, "DEC": 20.0})
    receipts = [
        {"kind": "calibrate", "items": {"a": {"no_airmass": why}, "b": {"no_airmass": why}, "c": {}}},
        {"kind": "calibrate", "items": {"d": {"status": "reused", "no_airmass": ""}}},
    ]
    gaps = airmass_gaps(receipts)
    assert gaps == {why: 2}
    assert calibration_notes({"no_airmass": gaps}) == [f"no AIRMASS in 2 lights: {why}"]
