"""Dark scaling: a light (or raw flat) without a dark of its exposure uses a longer,
bias-subtracted dark scaled by the exposure ratio; never without a bias, never scaled up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from conftest import REAL, real_set, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from imgproc.calibrate import MasterCache
from imgproc.cli import EXIT_INCOMPLETE, EXIT_OK
from imgproc.manifest import OK, SKIPPED
from imgproc.masterbuild import build_master
from imgproc.masters import MasterSettings, plan_masters
from imgproc.matching import match_dark
from imgproc.plan import PlanSettings, format_plan, make_plan
from imgproc.scan import ScanRequest, scan
from imgproc.stages import calibrate_entry, calibration_stamp, frame_diagnostics
from imgproc.synth import write_fits

UMD = REAL / "umd-st8-maximdl-ngc520-r"
SHAPE = (64, 97)  # NAXIS2 x NAXIS1: not square, not a power of two
CAMERA = {"INSTRUME": "TestCam", "GAIN": 100, "OFFSET": 20, "READOUTM": "Normal", "SET-TEMP": -10.0}
LIGHT_EXPTIME = 30.0
DATE = "2025-06-01T22:00:00"


def _pattern(seed: int, low: float, high: float) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, SHAPE).astype(np.float32)


BIAS = _pattern(1, 480.0, 520.0)
DARK_RATE = _pattern(2, 0.0, 2.0)  # ADU per second: hot and cold pixels
FLAT = _pattern(3, 0.7, 1.3) * np.float32(20000.0)
SKY = _pattern(4, 200.0, 400.0)


def _master(folder: Path, name: str, kind: str, data: np.ndarray, *, exptime: float = 0.0,
            date: str = DATE, **cards: object) -> Path:  # fmt: skip
    header = {**CAMERA, "IMAGETYP": kind, "EXPTIME": exptime, "DATE-OBS": date, "NCOMBINE": 10, **cards}
    write_fits(folder / name, data, header)
    return folder / name


@pytest.fixture
def night(tmp_path: Path) -> Path:
    """30 s lights; master darks of 10 s, 60 s and twice 120 s (the later one nearer the
    lights); a master bias and a master flat. None of the darks has the lights' exposure."""
    _master(tmp_path / "bias", "master_bias.fits", "Master Bias", BIAS)
    darks = tmp_path / "darks"
    for exptime, name, date in ((10.0, "master_dark_10s.fits", "2025-06-01T21:50:00"),
                                (60.0, "master_dark_60s.fits", "2025-06-01T21:59:00"),
                                (120.0, "master_dark_120s_early.fits", "2025-06-01T12:00:00"),
                                (120.0, "master_dark_120s_late.fits", "2025-06-01T21:40:00")):  # fmt: skip
        _master(darks, name, "Master Dark", DARK_RATE * np.float32(exptime), exptime=exptime, date=date)
    _master(tmp_path / "flats", "master_flat_V.fits", "Master Flat", FLAT, exptime=5.0, FILTER="V")
    for i in range(2):
        data = BIAS + DARK_RATE * np.float32(LIGHT_EXPTIME) + SKY * (FLAT / FLAT.mean())
        header = {**CAMERA, "IMAGETYP": "Light Frame", "EXPTIME": LIGHT_EXPTIME, "FILTER": "V",
                  "OBJECT": "Field", "DATE-OBS": f"2025-06-01T22:0{i}:00"}  # fmt: skip
        write_fits(tmp_path / "lights" / f"light_{i}.fits", data, header)
    return tmp_path


def _rows(night: Path, roles: tuple[str, ...] = ("bias", "dark", "flat")) -> list[dict]:
    folders = {"bias": night / "bias", "dark": night / "darks", "flat": night / "flats"}
    return scan(ScanRequest(night / "lights", {role: folders[role] for role in roles}))


def _dark(name: str, exptime: float, date: str = DATE, **extra: object) -> dict:
    return {"path": f"/m/{name}", "exptime": exptime, "date_obs": date, "instrume": "Cam", "ny": 64, "nx": 97,
            "xbinning": 1, "ybinning": 1, **extra}  # fmt: skip


LIGHT = _dark("light.fits", 30.0, "2025-06-01T22:00:00")


# --- choosing the dark -----------------------------------------------------------------------


def test_the_longest_dark_wins_then_the_nearest_in_time() -> None:
    darks = [
        _dark("d60.fits", 60.0, "2025-06-01T22:00:00"),
        _dark("d120_far.fits", 120.0, "2025-06-01T10:00:00"),
        _dark("d120_near.fits", 120.0, "2025-06-01T21:00:00"),
        _dark("d10.fits", 10.0),
    ]
    match = match_dark(LIGHT, darks, bias=True)
    assert (match.path, match.scale) == ("/m/d120_near.fits", 0.25)


def test_a_dark_of_the_lights_exposure_is_used_unscaled() -> None:
    match = match_dark(LIGHT, [_dark("d120.fits", 120.0), _dark("d30.fits", 30.005)], bias=True)
    assert (match.path, match.scale) == ("/m/d30.fits", None)


def test_no_bias_no_scaling_and_the_reason_says_a_bias_is_needed() -> None:
    match = match_dark(LIGHT, [_dark("d60.fits", 60.0)], bias=False)
    assert match.path is None
    assert match.reason == (
        "no matching dark master; nearest d60.fits differs in EXPTIME (30.0 vs 60.0); scaling d60.fits "
        "to 30 s needs a bias master (a dark without one carries the bias)"
    )


def test_a_dark_built_without_a_bias_is_not_scaled() -> None:
    carries_bias = _dark("built.fits", 60.0, members="/raw/a.fits;/raw/b.fits", bias=None)
    assert "needs a bias master" in match_dark(LIGHT, [carries_bias], bias=True).reason
    subtracted = {**carries_bias, "bias": "/m/bias.fits"}
    assert match_dark(LIGHT, [subtracted], bias=True).scale == 0.5


def test_switch_off_gives_todays_reason() -> None:
    match = match_dark(LIGHT, [_dark("d60.fits", 60.0)], bias=True, scaling=False)
    assert match.path is None
    assert match.reason == "no matching dark master; nearest d60.fits differs in EXPTIME (30.0 vs 60.0)"


def test_a_shorter_dark_is_not_scaled_up() -> None:
    match = match_dark(LIGHT, [_dark("d10.fits", 10.0), _dark("d3.fits", 3.0)], bias=True)
    assert match.path is None and match.reason.endswith(
        "; a shorter dark (3 s, 10 s) is not scaled up to 30 s"
    )


def test_a_dark_that_differs_in_more_than_exposure_is_not_scaled() -> None:
    match = match_dark(LIGHT, [_dark("d60.fits", 60.0, instrume="Other")], bias=True)
    assert match.path is None and match.reason.endswith(
        "differs in INSTRUME (Cam vs Other), EXPTIME (30.0 vs 60.0)"
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([1.0, 5.0, 30.0, 45.0, 60.0, 120.0, 300.0]), min_size=1, max_size=6))
def test_scaling_always_picks_the_longest_dark_and_scales_down(exposures: list[float]) -> None:
    darks = [_dark(f"d{i}.fits", exposure) for i, exposure in enumerate(exposures)]
    match = match_dark(LIGHT, darks, bias=True)
    if 30.0 in exposures:
        assert match.scale is None and match.path is not None
    elif max(exposures) > 30.0:
        assert match.scale == 30.0 / max(exposures) and match.scale < 1.0
        assert next(d for d in darks if d["path"] == match.path)["exptime"] == max(exposures)
    else:
        assert match.path is None


# --- the plan --------------------------------------------------------------------------------


def test_plan_carries_the_scale_and_shows_it(night: Path) -> None:
    rows = _rows(night)
    plan = make_plan(rows, PlanSettings())
    assert [(Path(e["dark"]).name, e["dark_scale"], e["status"]) for e in plan] == [
        ("master_dark_120s_late.fits", 0.25, OK)
    ] * 2
    assert "master_dark_120s_late.fits ×0.25" in format_plan(plan, rows)


def test_plan_without_a_bias_skips_the_lights_with_the_reason(night: Path) -> None:
    plan = make_plan(_rows(night, ("dark", "flat")), PlanSettings())
    assert {e["status"] for e in plan} == {SKIPPED}
    assert all("scaling master_dark_120s_late.fits to 30 s needs a bias master" in e["reason"] for e in plan)


def test_plan_with_the_switch_off_skips_as_before(night: Path) -> None:
    plan = make_plan(_rows(night), PlanSettings(dark_scaling=False))
    assert {(e["status"], e["dark"], e["dark_scale"]) for e in plan} == {(SKIPPED, None, None)}
    assert all(e["reason"].startswith("no matching dark master; nearest master_dark_60s.fits differs in "
                                      "EXPTIME (30.0 vs 60.0)") for e in plan)  # fmt: skip


# --- calibrating -----------------------------------------------------------------------------


def test_calibrated_pixels_header_and_stamp(night: Path, tmp_path: Path) -> None:
    entry = next(e for e in make_plan(_rows(night), PlanSettings()) if e["path"].endswith("light_0.fits"))
    work = tmp_path / "out" / "work"
    assert calibrate_entry(entry, work, MasterCache(), "ABC", 1)["status"] == "calibrated"
    target = next((tmp_path / "out" / "work" / "cal").glob("*.fits"))
    light = fits.getdata(night / "lights" / "light_0.fits")
    dark = fits.getdata(night / "darks" / "master_dark_120s_late.fits")
    expected = (light - BIAS - np.float32(0.25) * dark) / (FLAT / FLAT.mean(dtype=np.float64))
    data, header = fits.getdata(target, header=True)
    assert data.shape == SHAPE
    np.testing.assert_allclose(data, expected, rtol=2e-6)
    np.testing.assert_allclose(data, SKY, rtol=1e-4)  # the dark current is gone exactly
    assert header["DARKSCAL"] == 0.25 and header["DARKFILE"] == "master_dark_120s_late.fits"
    assert "exposure ratio" in header.comments["DARKSCAL"]
    assert "dark master_dark_120s_late.fits scaled by 0.25 (exposure ratio)" in [
        str(h) for h in header["HISTORY"]
    ]
    assert "dark=master_dark_120s_late.fits ×0.25 " in frame_diagnostics(entry, {"sky": 300.0, "noise": 1.0})
    # the stamp holds the scale: the same frame with another scale is calibrated again
    assert calibrate_entry(entry, work, MasterCache(), "ABC", 1)["status"] == "reused"
    halved = {**entry, "dark_scale": 0.125}
    assert calibration_stamp(halved, "ABC", 1) != calibration_stamp(entry, "ABC", 1)
    assert calibrate_entry(halved, work, MasterCache(), "ABC", 1)["status"] == "calibrated"
    np.testing.assert_allclose(fits.getdata(target), expected + np.float32(0.125) * dark * FLAT.mean() / FLAT,
                               rtol=2e-6)  # fmt: skip


def test_the_command_scales_and_the_switch_turns_it_off(night: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    flags = ["-B", night / "bias", "-D", night / "darks", "-F", night / "flats"]
    assert run_cli(night / "lights", out, *flags) == EXIT_OK
    outputs = sorted(out.glob("*.fits"))
    assert len(outputs) == 2
    for path in outputs:
        header, data = fits.getheader(path), fits.getdata(path)
        assert header["DARKSCAL"] == 0.25 and header["DARKFILE"] == "master_dark_120s_late.fits"
        np.testing.assert_allclose(data, SKY, rtol=1e-4)  # the dark current is gone exactly
    assert run_cli(night / "lights", out, *flags, "--set", "matching.dark_scaling=false") == EXIT_INCOMPLETE
    summary = (out / "summary.txt").read_text()
    assert summary.count("no matching dark master; nearest master_dark_60s.fits differs in EXPTIME") == 2
    assert run_cli(night / "lights", out, *flags) == EXIT_OK


# --- flats built from raw frames -------------------------------------------------------------


def _raw(folder: Path, name: str, kind: str, exptime: float, level: np.ndarray, **cards: object) -> None:
    header = {**CAMERA, "IMAGETYP": kind, "EXPTIME": exptime, "DATE-OBS": DATE, **cards}
    write_fits(folder / name, level, header)


@pytest.fixture
def raw_calibration(tmp_path: Path) -> Path:
    """Raw bias, darks of 60 s and 300 s, 5 s flats (no 5 s dark), one light."""
    for i in range(3):
        _raw(tmp_path / "bias", f"bias_{i}.fits", "Bias Frame", 0.0, BIAS)
        for exptime in (60.0, 300.0):
            _raw(tmp_path / "darks", f"dark{exptime:g}_{i}.fits", "Dark Frame", exptime,
                 BIAS + DARK_RATE * np.float32(exptime))  # fmt: skip
        _raw(tmp_path / "flats", f"flat_{i}.fits", "Flat Frame", 5.0,
             BIAS + DARK_RATE * np.float32(5.0) + FLAT * np.float32(1 + 0.1 * i), FILTER="V")  # fmt: skip
    _raw(tmp_path / "lights", "light.fits", "Light Frame", 300.0, BIAS + SKY, FILTER="V", OBJECT="F")
    return tmp_path


def _built(root: Path, roles: tuple[str, ...], settings: MasterSettings) -> dict[str, dict]:
    folders = {"bias": root / "bias", "dark": root / "darks", "flat": root / "flats"}
    built = plan_masters(scan(ScanRequest(root / "lights", {r: folders[r] for r in roles})), settings)
    return {f"{m['role']}{m['exptime'] or 0:g}": m for m in built if m["status"] == OK}


def test_raw_flats_get_the_longest_dark_scaled_and_darkscal(
    raw_calibration: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    masters = _built(raw_calibration, ("bias", "dark", "flat"), MasterSettings())
    flat = masters["flat5"]
    assert (flat["bias"], flat["dark"], flat["dark_scale"]) == (
        masters["bias0"]["path"],
        masters["dark300"]["path"],
        5.0 / 300.0,
    )
    assert masters["dark300"]["dark_scale"] is None and masters["dark300"]["bias"] == masters["bias0"]["path"]
    monkeypatch.chdir(raw_calibration)  # masters are built where the plan puts them, corrections first
    for key in ("bias0", "dark300"):
        data, header = build_master(masters[key], 64 << 20)
        Path(masters[key]["path"]).parent.mkdir(exist_ok=True)
        fits.writeto(masters[key]["path"], data, header)
    data, header = build_master(flat, 64 << 20)
    assert header["DARKSCAL"] == pytest.approx(5.0 / 300.0) and header["DARKFILE"] == Path(flat["dark"]).name
    assert any("scaled by 0.0166667 (exposure ratio)" in str(h) for h in header["HISTORY"])
    truth = FLAT / FLAT[16:48, 24:72].mean(dtype=np.float64)  # dark current removed exactly: no offset left
    np.testing.assert_allclose(data, truth, rtol=1e-5)


def test_raw_flats_without_bias_or_with_the_switch_off_get_no_dark(raw_calibration: Path) -> None:
    assert _built(raw_calibration, ("dark", "flat"), MasterSettings())["flat5"]["dark"] is None
    off = _built(raw_calibration, ("bias", "dark", "flat"), MasterSettings(dark_scaling=False))["flat5"]
    assert (off["dark"], off["dark_scale"]) == (None, None)


# --- real frames: the UMD ST-8 night ---------------------------------------------------------


def umd_darks(folder: Path, pattern: str) -> Path:
    """A dark folder holding only the UMD darks that match ``pattern`` (linked)."""
    umd = real_set(UMD.name)
    folder.mkdir()
    for path in sorted(umd.glob(f"darks/{pattern}")):
        (folder / path.name).symlink_to(path)
    return folder


def test_umd_flats_with_only_300s_darks_get_them_scaled(tmp_path: Path) -> None:
    """The g night's case on the r night's frames: 3 s flats, only the 300 s darks (the lights'
    exposure). The flats are built with the 300 s dark scaled by 0.01; the lights need none."""
    darks = umd_darks(tmp_path / "darks300", "calib-00?-dark.fit")
    out = tmp_path / "out"
    assert run_cli(UMD / "lights", out, "-B", UMD / "bias", "-D", darks, "-F", UMD / "flats") == EXIT_OK
    flat = next((out / "masters").glob("master_flat_*.fits"))
    header = fits.getheader(flat)
    assert header["DARKSCAL"] == pytest.approx(0.01) and header["DARKFILE"].startswith("master_dark_300s_")
    outputs = sorted(out.glob("*.fits"))
    assert len(outputs) == 9
    assert all("DARKSCAL" not in fits.getheader(p) and fits.getheader(p)["DARKCAL"] for p in outputs)


def test_umd_lights_with_only_3s_darks_are_not_scaled_up(tmp_path: Path) -> None:
    """The 3 s darks sit ~17 ADU above the bias: scaled x100 they would take 1700 ADU off an
    ~800 ADU sky. The 300 s lights are skipped, saying why."""
    darks = umd_darks(tmp_path / "darks3", "calib-00?-dark03.fit")
    out = tmp_path / "out"
    status = run_cli(UMD / "lights", out, "-B", UMD / "bias", "-D", darks, "-F", UMD / "flats", "--plan")
    assert status == EXIT_INCOMPLETE
    plan = (out / "plan.txt").read_text()
    assert plan.count("a shorter dark (3 s) is not scaled up to 300 s") == 9
