"""End-to-end: the imgproc command and the Snakemake workflow on small generated nights."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS
from conftest import REPO, master_flags, run_cli, run_cli_process, sha256_tree

from imgproc.cli import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE
from imgproc.naming import output_name


def expected_calibration(light: Path, night, bin_factor: int = 1) -> np.ndarray:
    """Independent float64 computation of a calibrated (and binned) light."""
    names = night.expected_masters[light.name]
    raw = fits.getdata(light).astype(np.float64)
    bias = fits.getdata(night.bias_dir / names["bias"]).astype(np.float64)
    dark = fits.getdata(night.dark_dir / names["dark"]).astype(np.float64)
    flat = fits.getdata(night.flat_dir / names["flat"]).astype(np.float64)
    result = (raw - bias - dark) / (flat / flat.mean())
    if bin_factor > 1:
        ny, nx = (s // bin_factor * bin_factor for s in result.shape)
        result = (
            result[:ny, :nx]
            .reshape(ny // bin_factor, bin_factor, nx // bin_factor, bin_factor)
            .mean(axis=(1, 3))
        )
    return result


def mid_time(light: Path) -> datetime:
    header = fits.getheader(light)
    return datetime.fromisoformat(header["DATE-OBS"]) + timedelta(seconds=header["EXPTIME"] / 2)


def expected_name(light: Path, observer: str = "DGAH") -> str:
    header = fits.getheader(light)
    return output_name(header["OBJECT"], observer, header["FILTER"], mid_time(light))


def test_cli_calibrates_every_light_with_matched_masters(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    outputs = sorted(p.name for p in out.glob("*.fits"))
    assert outputs == sorted(expected_name(light) for light in night.lights)
    for light in night.lights:
        with fits.open(out / expected_name(light), checksum=True) as hdul:
            header, data = hdul[0].header, hdul[0].data
        names = night.expected_masters[light.name]
        assert header["BITPIX"] == -32 and "BZERO" not in header and "BSCALE" not in header
        assert header["BIASCAL"] is True and header["DARKCAL"] is True and header["FLATCAL"] is True
        assert (header["BIASFILE"], header["DARKFILE"], header["FLATFILE"]) == (
            names["bias"], names["dark"], names["flat"],
        )  # fmt: skip
        assert header["OBSERVER"] == "DGAH"
        assert header["DATE-AVG"] == mid_time(light).isoformat(timespec="milliseconds")
        assert any("imgproc" in str(card) for card in header["HISTORY"])
        np.testing.assert_allclose(data, expected_calibration(light, night), rtol=2e-6, atol=2e-3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["outputs"] == len(night.lights) and summary["skipped"] == []
    # the jobs ran in the Snakemake process: no `script:` job wrote its script for a new interpreter
    assert not (out / ".snakemake" / "scripts").exists()
    assert {p.name for p in (out / "logs").iterdir()} >= {"calibrate", "publish", "scan_headers.log"}


def test_output_name_uses_mid_exposure_jd(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    light = night.lights[0]
    jd = Time(mid_time(light), scale="utc").jd
    name = expected_name(light)
    assert name.endswith(f"_{jd:.8f}.fits") and name.startswith("V1234_Cyg_DGAH_")
    assert (out / name).exists()


def test_cli_binning_scales_pixels_and_wcs(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-b", "2") == EXIT_OK
    light = night.lights[0]
    with fits.open(out / expected_name(light)) as hdul:
        header, data = hdul[0].header, hdul[0].data
    raw_header = fits.getheader(light)
    assert data.shape == (32, 32)
    assert header["XBINNING"] == 2 and header["YBINNING"] == 2
    assert header["XPIXSZ"] == pytest.approx(2 * raw_header["XPIXSZ"])
    np.testing.assert_allclose(data, expected_calibration(light, night, 2), rtol=2e-6, atol=2e-3)
    # the centre of binned pixel (x', y') is the centre of its 2x2 block in the original frame
    before, after = WCS(raw_header), WCS(header)
    sky_after = after.pixel_to_world(np.array([3.0, 10.0]), np.array([5.0, 20.0]))
    sky_before = before.pixel_to_world(np.array([6.5, 20.5]), np.array([10.5, 40.5]))
    assert np.all(sky_after.separation(sky_before).arcsec < 1e-3)


def test_cli_filter_keeps_only_that_filter(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-f", "v") == EXIT_OK  # any case
    names = sorted(p.name for p in out.glob("*.fits"))
    assert names and all("_V_" in name for name in names)
    assert len(names) == sum(fits.getheader(light)["FILTER"] == "V" for light in night.lights)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and len(summary["listed"]) == len(night.lights) - len(names)
    assert all("(-f)" in item["reason"] for item in summary["listed"])


def test_cli_filter_no_light_has_is_a_usage_error_naming_the_filters(night, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-f", "Ha") == EXIT_USAGE
    error = capsys.readouterr().err
    assert "no light has the filter 'Ha' (-f); the lights' filters: 'R', 'V'" in error
    assert not list(out.glob("*.fits"))
    assert run_cli(night.root / "lights", out, *master_flags(night), "-f", "Ha", "--plan") == EXIT_USAGE


def test_outputs_and_masters_get_the_umask_permissions(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        assert run_cli(night.root / "lights", out, *master_flags(night), "-s", "-S", "2") == EXIT_OK
    finally:
        os.umask(old)
    files = [*out.glob("*.fits"), *(out / "work" / "cal").glob("*.fits")]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o640}


def test_cli_observer_code_in_names_and_header(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-o", "XYZ") == EXIT_OK
    name = expected_name(night.lights[0], "XYZ")
    assert fits.getheader(out / name)["OBSERVER"] == "XYZ"


def test_cli_without_matching_bias_skips_lights_and_exits_incomplete(night, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong_bias"
    wrong.mkdir()
    shutil.copy(night.bias_dir / "bias_g0.fits", wrong)
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, "-B", wrong) == EXIT_INCOMPLETE
    assert not list(out.glob("*.fits"))
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["complete"] and len(summary["skipped"]) == len(night.lights)
    reason = summary["skipped"][0]["reason"]
    assert "bias_g0.fits" in reason and "GAIN" in reason
    assert "bias_g0.fits" in (out / "summary.txt").read_text()


def test_cli_one_bad_light_does_not_stop_the_night(night, tmp_path: Path) -> None:
    (night.root / "lights" / "broken.fits").write_bytes(b"this is not a FITS file" * 200)
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_INCOMPLETE
    assert len(list(out.glob("*.fits"))) == len(night.lights)
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(s["file"]).name for s in summary["skipped"]] == ["broken.fits"]


def test_cli_default_output_folder_beside_input(night) -> None:
    assert run_cli(night.root / "lights", *master_flags(night)) == EXIT_OK
    first = min(night.lights, key=lambda p: fits.getheader(p)["DATE-OBS"])
    date = fits.getheader(first)["DATE-OBS"][:10]
    out = night.root / f"V1234_Cyg_{date}_DGAH_CAL"
    assert out.is_dir() and len(list(out.glob("*.fits"))) == len(night.lights)


def test_rerun_does_no_work_and_keeps_bytes(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    before = sha256_tree(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.fits")}
    result = run_cli_process(night.root / "lights", out, *master_flags(night))
    assert result.returncode == EXIT_OK, result.stderr
    assert "Nothing to be done" in result.stderr
    assert sha256_tree(out) == before
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.fits")} == mtimes


def test_rerun_recovers_from_stale_lock_and_deleted_output(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    before = sha256_tree(out)
    victim = sorted(out.glob("*.fits"))[0]
    victim.unlink()
    locks = out / ".snakemake" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    (locks / "0.input.lock").write_text(str(night.lights[0]))  # as left by a kill -9
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    assert sha256_tree(out) == before


def test_changing_a_config_value_redoes_the_outputs(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    assert run_cli(night.root / "lights", out, *master_flags(night), "-o", "NEW") == EXIT_OK
    for light in night.lights:
        assert fits.getheader(out / expected_name(light, "NEW"))["OBSERVER"] == "NEW"


def test_dry_run_passthrough_writes_no_output(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli_process(night.root / "lights", out, *master_flags(night), "-c", "1", "--", "--dry-run")
    assert result.returncode == EXIT_OK, result.stderr
    assert "scan_headers" in result.stdout + result.stderr
    assert not list(out.glob("*.fits")) and not (out / "summary.json").exists()


def test_concurrency_sets_snakemake_cores_and_not_the_bytes(night, tmp_path: Path) -> None:
    digests = {}
    for cores in ("1", "2"):
        out = tmp_path / f"out{cores}"
        assert run_cli(night.root / "lights", out, *master_flags(night), "-c", cores) == EXIT_OK
        log = "".join(p.read_text() for p in (out / ".snakemake" / "log").glob("*.log"))
        assert f"Provided cores: {cores}" in log
        digests[cores] = sha256_tree(out)
    assert digests["1"] == digests["2"] and len(digests["1"]) == len(night.lights)


def test_verbose_logs_per_frame_diagnostics(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-v") == EXIT_OK
    logs = "".join(p.read_text() for p in (out / "logs" / "calibrate").glob("*.log"))
    assert "sky=" in logs and "noise=" in logs and "bias=bias_g120.fits" in logs


@pytest.mark.parametrize("folder", ["lights", "bias"])
def test_plain_snakemake_refuses_an_output_folder_that_is_an_input(night, folder: str) -> None:
    root = night.root.resolve()
    config = {"input_dir": root / "lights", "bias_dir": root / "bias", "output_dir": root / folder}
    before = sorted(root.rglob("*"))
    command = [sys.executable, "-m", "snakemake", "--cores", "1", "--config"]
    result = subprocess.run(
        [*command, *(f"{k}={v}" for k, v in config.items())], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode != 0
    role = "inside the input folder" if folder == "lights" else "the bias folder"
    assert f"config output_dir: output folder {root / folder} is {role}" in result.stdout + result.stderr
    assert sorted(root.rglob("*")) == before


def test_plain_snakemake_repeats_the_run_from_the_written_config(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    config = yaml.safe_load((out / "imgproc.yaml").read_text())
    assert config["input_dir"] == str((night.root / "lights").resolve())
    again = tmp_path / "again"
    config["output_dir"] = str(again)
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", str(tmp_path / "again.yaml")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert sha256_tree(again) == sha256_tree(out)
    # plain snakemake loads profiles/default too: its jobs also ran in-process
    assert "workflow specific profile" in result.stdout + result.stderr
    assert not (again / ".snakemake" / "scripts").exists()


def test_workflow_profile_keeps_the_job_rate_limiter_from_waking_the_scheduler(night, tmp_path: Path) -> None:
    """Snakemake's default limiter (100/1s) re-arms a one-second Timer on every scheduling round,
    so each ended job left a chain of rounds once a second; profiles/default sets a 10-minute
    timespan, and the run still ends at once (the pending Timers are cancelled at exit)."""
    out = tmp_path / "out"
    started = time.monotonic()
    assert run_cli(night.root / "lights", out, *master_flags(night), "--", "--verbose") == EXIT_OK
    log = "".join(p.read_text() for p in (out / ".snakemake" / "log").glob("*.log"))
    assert "Submitting maximum 10000 job(s) over 600.0 second(s)." in log
    assert time.monotonic() - started < 60


def test_invalid_config_value_names_the_key(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, "--", "--dry-run") == EXIT_OK
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(out / "imgproc.yaml"),
         "--config", "bin=0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "['bin']" in message and "less than the minimum of 1" in message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing_folder"], "is not a folder"),
        (["empty"], "no FITS files"),
        (["lights", "lights/out"], "inside the input folder"),
        (["lights", "out", "-B", "empty"], "holds no FITS files"),
        (["lights", "bias", "-B", "bias"], "output folder {root}/bias is the bias folder; choose another"),
    ],
)
def test_usage_errors_are_one_line_messages(night, args: list[str], message: str, capsys) -> None:
    (night.root / "empty").mkdir()
    resolved = [str(night.root / a) if not a.startswith("-") else a for a in args]
    before = sorted(night.root.rglob("*"))
    assert run_cli(*resolved) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message.format(root=night.root.resolve()) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(night.root.rglob("*")) == before  # nothing written anywhere


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-b", "0"], "argument -b/--bin-level: 0 must be 1 or more"),
        (["-b", "100000"], "argument -b/--bin-level: 100000 is more than 64"),
        (["-o", ""], "argument -o/--observer: observer code '' must be 1-64 characters of A-Z a-z 0-9"),
        (["-o", "Zoë"], "observer code 'Zoë' must be 1-64 characters of A-Z a-z 0-9 . _ + - (not starting"),
        (["-o", "A B"], "observer code 'A B' must be"),
    ],
)
def test_out_of_range_flag_is_rejected(night, tmp_path: Path, flags: list[str], message: str) -> None:
    result = run_cli_process(night.root / "lights", tmp_path / "out", *flags)
    assert result.returncode == EXIT_USAGE and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing is written before the flags are valid


def test_compressed_inputs_are_calibrated(night, tmp_path: Path) -> None:
    packed = tmp_path / "packed"
    packed.mkdir()
    fz, gz, *rest = night.lights
    with fits.open(fz) as hdul:
        comp = fits.CompImageHDU(hdul[0].data, hdul[0].header, compression_type="RICE_1")
        fits.HDUList([fits.PrimaryHDU(), comp]).writeto(packed / fz.with_suffix(".fz").name)
    with fits.open(gz) as hdul:
        hdul.writeto(packed / (gz.name + ".gz"))
    for light in rest:
        shutil.copy(light, packed)
    reference_out, packed_out = tmp_path / "ref", tmp_path / "packed_out"
    assert run_cli(night.root / "lights", reference_out, *master_flags(night)) == EXIT_OK
    assert run_cli(packed, packed_out, *master_flags(night)) == EXIT_OK
    for light in (fz, gz):
        name = expected_name(light)
        np.testing.assert_array_equal(fits.getdata(packed_out / name), fits.getdata(reference_out / name))


def test_plan_shows_every_light_and_calibrates_nothing(night, tmp_path: Path) -> None:
    wrong = tmp_path / "bias_wrong_gain"
    wrong.mkdir()
    shutil.copy(night.bias_dir / "bias_g0.fits", wrong)
    out = tmp_path / "out"
    result = run_cli_process(night.root / "lights", out, "-B", wrong, "-s", "-S", "2", "--plan")
    assert result.returncode == EXIT_INCOMPLETE, result.stderr
    text = (out / "plan.txt").read_text()
    assert result.stdout == text
    for light in night.lights:
        line = next(row for row in text.splitlines() if row.startswith(light.name))
        assert "SKIPPED: no matching bias master; nearest bias_g0.fits differs in GAIN" in line
    assert not list(out.glob("*.fits")) and not (out / "work" / "cal").exists()
    good = tmp_path / "good"
    assert run_cli(night.root / "lights", good, *master_flags(night), "-s", "-S", "2", "--plan") == EXIT_OK
    text = (good / "plan.txt").read_text()
    assert "2 frames" in text and "flat_V.fits" in text and "dark_60s.fits" in text
    assert f"{len(night.lights)} lights -> 4 outputs" in text


def test_relative_profile_path_is_made_absolute(tmp_path: Path, monkeypatch) -> None:
    from imgproc.cli import split_passthrough

    (tmp_path / "profiles" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    ours, extra = split_passthrough(["lights", "-a", "--", "--profile", "profiles/mine", "--dry-run"])
    assert ours == ["lights", "-a"]
    assert extra == ["--profile", str(tmp_path / "profiles" / "mine"), "--dry-run"]
    assert split_passthrough(["lights", "--", "--profile", "slurm"])[1] == ["--profile", "slurm"]


def test_summary_files_are_the_same_bytes_for_the_same_night(night, tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert run_cli(night.root / "lights", tmp_path / name, *master_flags(night)) == EXIT_OK
    for summary in ("summary.json", "summary.txt"):
        assert (tmp_path / "a" / summary).read_bytes() == (tmp_path / "b" / summary).read_bytes()
    assert "s of calibrate and publish work" in (tmp_path / "a" / "logs" / "summarize.log").read_text()


def test_a_refused_second_run_leaves_the_live_runs_files_alone(night, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with open(out / ".imgproc.lock", "a+") as live:  # a run at work in this folder
        fcntl.flock(live, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_cli(night.root / "lights", out, *master_flags(night), "-b", "2", "-s") == EXIT_USAGE
    assert "another imgproc run is working in" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
