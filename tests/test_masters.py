"""Masters built from raw calibration frames inside the workflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from conftest import TIRCAM, real_set, run_cli

from imgproc.cli import EXIT_OK
from imgproc.manifest import read_tsv
from imgproc.masters import MasterSettings, group_raw, plan_masters

SHAPE = (48, 64)
BIAS, DARK_RATE, FLAT_LEVEL = 500.0, 2.0, 20000.0
CAMERA = {"INSTRUME": "TestCam", "GAIN": 120, "OFFSET": 30, "READOUTM": "Normal", "SET-TEMP": -10.0}


def vignetting() -> np.ndarray:
    y, x = np.mgrid[: SHAPE[0], : SHAPE[1]]
    r2 = ((y - SHAPE[0] / 2) / SHAPE[0]) ** 2 + ((x - SHAPE[1] / 2) / SHAPE[1]) ** 2
    return (1.0 - 0.6 * r2).astype(np.float32)


def raw_frame(folder: Path, name: str, kind: str, *, seed: int, exptime: float = 0.0, filt: str | None = None,
              date: str = "2025-05-01T12:00:00", **cards: object) -> Path:  # fmt: skip
    """A raw uint16 calibration frame with known signal (bias + dark current [+ flat light])."""
    rng = np.random.default_rng(seed)
    signal = np.full(SHAPE, BIAS, np.float64) + DARK_RATE * exptime
    if kind == "Flat Frame":
        signal = signal + FLAT_LEVEL * (1 + 0.1 * seed) * vignetting()
    data = np.clip(np.round(signal + rng.normal(0, 3, SHAPE)), 0, 65535).astype(np.uint16)
    header = fits.Header({**CAMERA, "IMAGETYP": kind, "EXPTIME": exptime, "DATE-OBS": date, **cards})
    if filt:
        header["FILTER"] = filt
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fits.PrimaryHDU(data, header).writeto(path)
    return path


def light_frame(folder: Path, name: str, seed: int) -> Path:
    rng = np.random.default_rng(100 + seed)
    sky = 300.0 * vignetting()
    data = BIAS + DARK_RATE * 60 + sky + rng.normal(0, 2, SHAPE)
    header = fits.Header({**CAMERA, "IMAGETYP": "LIGHT", "EXPTIME": 60.0, "FILTER": "V", "OBJECT": "Field",
                          "DATE-OBS": f"2025-05-01T22:0{seed}:00"})  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(np.round(data).astype(np.uint16), header).writeto(folder / name)
    return folder / name


@pytest.fixture
def raw_night(tmp_path: Path) -> Path:
    """Lights plus raw bias, dark (60 s) and flat (5 s, no dark of that exposure) frames."""
    for i in range(3):
        raw_frame(tmp_path / "bias", f"bias_{i}.fits", "Bias Frame", seed=i)
        raw_frame(tmp_path / "darks", f"dark_{i}.fits", "Dark Frame", seed=10 + i, exptime=60.0)
        raw_frame(tmp_path / "flats", f"flat_{i}.fits", "Flat Frame", seed=i, exptime=5.0, filt="V")
    for i in range(2):  # a group too small to build: reported, not used
        raw_frame(tmp_path / "bias", f"bias_gain0_{i}.fits", "Bias Frame", seed=20 + i, GAIN=0)
    for i in range(3):
        light_frame(tmp_path / "lights", f"light_{i}.fits", i)
    return tmp_path


def test_raw_frames_become_masters_that_calibrate_the_lights(raw_night: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    flags = ["-B", raw_night / "bias", "-D", raw_night / "darks", "-F", raw_night / "flats"]
    assert run_cli(raw_night / "lights", out, *flags) == EXIT_OK
    built = {p.name.split("_")[1]: p for p in (out / "masters").glob("*.fits")}
    assert sorted(built) == ["bias", "dark", "flat"]
    bias, dark, flat = (fits.getdata(built[k]) for k in ("bias", "dark", "flat"))
    headers = {k: fits.getheader(p) for k, p in built.items()}
    assert headers["bias"]["IMAGETYP"] == "masterBIAS" and headers["bias"]["NCOMBINE"] == 3
    assert headers["dark"]["IMAGETYP"] == "masterDARK" and headers["dark"]["BIASFILE"] == built["bias"].name
    assert headers["flat"]["IMAGETYP"] == "masterFLAT" and headers["flat"]["DARKFILE"] == built["dark"].name
    assert headers["flat"]["DARKSCAL"] == pytest.approx(5.0 / 60.0)
    assert all(f"bias_{i}.fits" in " ".join(map(str, headers["bias"]["HISTORY"])) for i in range(3))
    assert abs(float(np.mean(bias)) - BIAS) < 1.0
    assert abs(float(np.mean(dark)) - DARK_RATE * 60) < 1.0  # bias-subtracted: dark current only
    ny, nx = SHAPE
    centre = flat[ny // 4 : 3 * ny // 4, nx // 4 : 3 * nx // 4]
    assert float(np.mean(centre, dtype=np.float64)) == pytest.approx(1.0, abs=1e-5)
    truth = vignetting() / vignetting()[ny // 4 : 3 * ny // 4, nx // 4 : 3 * nx // 4].mean()
    np.testing.assert_allclose(flat, truth, atol=2e-3)
    for light in sorted(out.glob("*.fits")):
        header, data = fits.getheader(light), fits.getdata(light)
        assert (header["BIASFILE"], header["DARKFILE"], header["FLATFILE"]) == tuple(
            built[k].name for k in ("bias", "dark", "flat")
        )
        assert np.std(data) / np.mean(data) < 0.02  # vignetting removed: the sky is flat
    table = {Path(r["path"]).name: r for r in read_tsv(out / "work" / "masters.tsv")}
    small = [r for r in table.values() if r["status"] == "skipped"]
    assert len(small) == 1 and "only 2 raw bias frames; at least 3 are needed" in small[0]["reason"]


def test_built_masters_are_reused_and_rebuilt_only_when_inputs_change(
    raw_night: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    flags = ["-B", raw_night / "bias", "-F", raw_night / "flats"]
    assert run_cli(raw_night / "lights", out, *flags) == EXIT_OK
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "masters").glob("*.fits")}
    assert run_cli(raw_night / "lights", out, *flags) == EXIT_OK
    assert {p.name: p.stat().st_mtime_ns for p in (out / "masters").glob("*.fits")} == stamps
    raw_frame(raw_night / "flats", "flat_3.fits", "Flat Frame", seed=3, exptime=5.0, filt="V")
    assert run_cli(raw_night / "lights", out, *flags) == EXIT_OK
    now = {p.name: p.stat().st_mtime_ns for p in (out / "masters").glob("*.fits")}
    bias_name = next(n for n in stamps if n.startswith("master_bias"))
    assert now[bias_name] == stamps[bias_name]  # the bias group did not change
    new_flats = [n for n in now if n.startswith("master_flat") and n not in stamps]
    assert len(new_flats) == 1 and fits.getheader(out / "masters" / new_flats[0])["NCOMBINE"] == 4


def test_finished_master_takes_precedence_over_raw_frames(raw_night: Path, tmp_path: Path) -> None:
    finished = raw_night / "bias" / "master_bias_finished.fits"
    fits.PrimaryHDU(
        np.full(SHAPE, BIAS, np.float32), fits.Header({**CAMERA, "IMAGETYP": "Master Bias"})
    ).writeto(finished)
    out = tmp_path / "out"
    assert run_cli(raw_night / "lights", out, "-B", raw_night / "bias") == EXIT_OK
    assert not list((out / "masters").glob("master_bias*")) if (out / "masters").exists() else True
    assert all(fits.getheader(p)["BIASFILE"] == finished.name for p in out.glob("*.fits"))
    reasons = [r["reason"] for r in read_tsv(out / "work" / "masters.tsv") if r["role"] == "bias"]
    assert any(f"finished master {finished.name} covers this group" in r for r in reasons)


def test_group_raw_splits_on_matching_keywords() -> None:
    def row(name: str, **values: object) -> dict:
        base = {"path": name, "instrume": "Cam", "gain": 120.0, "offset": 30.0, "readoutm": None,
                "set_temp": -10.0, "exptime": 60.0, "filter": "V", "xbinning": 1, "ybinning": 1,
                "ny": 8, "nx": 8}  # fmt: skip
        return base | values

    rows = [
        row("a"),
        row("b", set_temp=-10.4),
        row("c", set_temp=-11.0),
        row("d", exptime=30.0),
        row("e", filter="R"),
    ]
    settings = MasterSettings()
    assert [[r["path"] for r in g] for g in group_raw(rows, "bias", settings)] == [
        ["a", "b", "d", "e"],
        ["c"],
    ]
    assert [[r["path"] for r in g] for g in group_raw(rows, "dark", settings)] == [
        ["a", "b", "e"],
        ["c"],
        ["d"],
    ]
    # flats ignore SET-TEMP and EXPTIME
    flats = [[r["path"] for r in g] for g in group_raw(rows, "flat", settings)]
    assert flats == [["a", "b", "c", "d"], ["e"]]
    planned = plan_masters(
        [r | {"folder": "bias", "status": "ok", "is_master": False, "date_obs": None} for r in rows],
        MasterSettings(min_frames=2),
    )
    assert [(m["n_frames"], m["status"]) for m in planned] == [(4, "ok"), (1, "skipped")]


def test_tircam2_raw_bias_and_flats_become_masters(tmp_path: Path) -> None:
    real_set(TIRCAM.name)
    folders = {name: tmp_path / name for name in ("lights", "bias", "flats")}
    for folder, pattern in (
        (folders["lights"], "IC310_*"),
        (folders["bias"], "bias_*"),
        (folders["flats"], "flats*"),
    ):
        folder.mkdir()
        for path in sorted(TIRCAM.glob(pattern)):
            (folder / path.name).symlink_to(path)
    out = tmp_path / "out"
    assert run_cli(folders["lights"], out, "-B", folders["bias"], "-F", folders["flats"]) == EXIT_OK
    (bias_path,) = (out / "masters").glob("master_bias_*.fits")
    (flat_path,) = (out / "masters").glob("master_flat_J_*.fits")
    raw_bias = np.array([fits.getdata(p).astype(np.float64) for p in sorted(TIRCAM.glob("bias_*.fits"))])
    bias = fits.getdata(bias_path)
    assert fits.getheader(bias_path)["NCOMBINE"] == 3 and fits.getheader(flat_path)["NCOMBINE"] == 5
    assert abs(float(np.median(bias)) - float(np.median(raw_bias))) < 20  # pedestal ~40700 ADU
    assert float(np.median(np.abs(bias - np.median(raw_bias, axis=0)))) < 3
    flat = fits.getdata(flat_path)
    assert float(np.nanmean(flat[128:384, 128:384], dtype=np.float64)) == pytest.approx(1.0, abs=1e-5)
    outputs = sorted(out.glob("*.fits"))
    assert len(outputs) == 5
    for index, output in enumerate(outputs, start=1):
        header = fits.getheader(output)
        assert (header["BIASFILE"], header["FLATFILE"]) == (bias_path.name, flat_path.name)
        before = fits.getdata(TIRCAM / f"IC310_{index}.fits").astype(np.float64) - bias
        # large-scale structure (medians of 32x32 blocks, robust spread) drops >3x with the flat
        assert block_spread(fits.getdata(output)) < min(0.06, block_spread(before) / 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"]


def block_spread(data: np.ndarray) -> float:
    medians = np.nanmedian(data[:512, :512].reshape(16, 32, 16, 32), axis=(1, 3))
    centre = np.nanmedian(medians)
    return float(1.4826 * np.nanmedian(np.abs(medians - centre)) / centre)


def test_lone_unflagged_master_is_not_mistaken_for_a_master(raw_night: Path, tmp_path: Path) -> None:
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(raw_night / "bias" / "bias_0.fits", lonely)
    out = tmp_path / "out"
    assert run_cli(raw_night / "lights", out, "-B", lonely) != EXIT_OK
    summary = json.loads((out / "summary.json").read_text())
    assert all("no bias master" in s["reason"] for s in summary["skipped"])
