"""Honest outcomes: internal errors fail the run (exit 1) while input problems skip lights
(exit 3), progress counts what was written, and the summary says what was not done to the
lights (calibration steps without a master folder, colour frames processed as mono)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from conftest import REPO, master_flags, run_cli

import imgproc.stages
from imgproc.cli import EXIT_FAILED, EXIT_INCOMPLETE, EXIT_OK, report
from imgproc.keywords import normalise
from imgproc.manifest import write_tsv
from imgproc.plan import COLUMNS, calibration_gaps, format_plan
from imgproc.progress import count_progress
from imgproc.stages import format_summary, job_logging, run_calibrate_batch, summarise
from imgproc.stamps import read_json, write_json
from imgproc.synth import write_fits

#: Loaded by the Snakemake process (PYTHONPATH) of a run: the first aligned output's resampling
#: raises the ValueError a bug in our own array code would.
INJECT = f"""
import sys, threading
sys.path.insert(0, {str(REPO)!r})
import imgproc.publish as publish
_lock, _calls, _original = threading.Lock(), [], publish.apply_shift
def apply_shift(*args, **kwargs):
    with _lock:
        _calls.append(1)
        first = len(_calls) == 1
    if first:
        raise ValueError("injected: cannot reshape array of size 96900 into shape (15,17,23,16)")
    return _original(*args, **kwargs)
publish.apply_shift = apply_shift
"""


def test_an_internal_error_in_one_output_fails_the_run_and_the_rest_is_written(
    night, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The workflow runs in a Snakemake process of its own: the fault goes in through sitecustomize.
    inject = tmp_path / "inject"
    inject.mkdir()
    before = os.environ.get("PYTHONPATH", "")
    (inject / "sitecustomize.py").write_text(INJECT, encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(inject), str(REPO), before]))
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-a") == EXIT_FAILED

    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs_failed"] == 1 and summary["outputs"] == len(night.lights) - 1
    ((name, reason),) = summary["failed_outputs"].items()
    assert reason.startswith("publishing failed: internal error ValueError: injected: cannot reshape")
    assert summary["skipped"] == [] and summary["skipped_outputs"] == {} and not summary["complete"]
    assert not (out / name).exists()
    assert all((out / written).is_file() for written in summary["output_files"])
    text = (out / "summary.txt").read_text().splitlines()
    assert ", 1 outputs failed, 0 lights skipped" in text[0]
    assert any(
        line.startswith(f"  output {name} FAILED: publishing failed: internal error ValueError")
        for line in text
    )
    assert text[-1].startswith("FAILED")
    receipts = [read_json(p) for p in (out / "work" / "published").glob("*.json")]
    assert [i["status"] for r in receipts for i in r["items"].values()].count("failed") == 1
    logs = "".join(p.read_text() for p in (out / "logs" / "publish").glob("*.log"))
    assert f"{name}: publishing failed: internal error" in logs
    assert "Traceback" in logs and "ValueError: injected: cannot reshape" in logs
    assert count_progress(out, 0.0)[2:4] == (len(night.lights) - 1, len(night.lights))

    # The same command again, without the fault: the failed output is tried again and made.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), before]))
    assert run_cli(night.root / "lights", out, *master_flags(night), "-a") == EXIT_OK
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs_failed"] == 0 and (out / name).is_file() and summary["complete"]


def _entries(night) -> list[dict]:
    """Plan rows of the night's first four lights, with the columns calibration reads."""
    ny, nx = fits.getdata(night.lights[0]).shape
    return [
        {
            "frame_id": f"f{i}",
            "path": str(path),
            "hdu": 0,
            "mid": f"2025-05-02T0{i}:00:00",
            "exptime": 60.0,
            "pub_kind": "stack",
            "ny": ny,
            "nx": nx,
        }
        for i, path in enumerate(night.lights[:4])
    ]


def test_calibrate_batch_tells_input_problems_from_internal_errors(
    night, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = _entries(night)
    truncated, gone, buggy, good = (Path(e["path"]) for e in entries)
    whole = truncated.read_bytes()
    truncated.write_bytes(whole[: len(whole) * 2 // 3])
    gone.unlink()  # removed after the scan
    original = imgproc.stages.calibrate_frame

    def calibrate_frame(path: Path, *args, **kwargs):
        if path == buggy:
            raise IndexError("index 70 is out of bounds for axis 1 with size 53")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(imgproc.stages, "calibrate_frame", calibrate_frame)
    log = tmp_path / "logs" / "c0000.log"
    receipt = tmp_path / "work" / "calibrated" / "c0000.json"
    with job_logging(log):
        results = run_calibrate_batch(entries, tmp_path / "work", receipt, observer="DGAH", binning=1)
    statuses = {e["path"]: results[e["frame_id"]]["status"] for e in entries}
    assert statuses == {
        str(truncated): "skipped",
        str(gone): "skipped",
        str(buggy): "failed",
        str(good): "calibrated",
    }
    assert (
        results["f2"]["reason"]
        == "calibration failed: internal error IndexError: index 70 is out of bounds for axis 1 with size 53"
    )
    assert "truncated" in results["f0"]["reason"] and "No such file" in results["f1"]["reason"]
    assert (tmp_path / "work" / "cal" / "f3.fits").is_file()
    text = log.read_text()
    assert "Traceback" in text and f"{buggy}: calibration failed: internal error" in text
    assert text.count("Traceback") == 1  # input problems are one line each
    assert read_json(receipt)["items"] == results


def _manifest(paths: list[str], folders: tuple[str, ...] = (), bayerpat: str | None = None) -> list[dict]:
    light = {"folder": "light", "role": "light", "status": "ok", "reason": "", "bayerpat": bayerpat}
    rows = [{"path": p, **light} for p in paths]
    return rows + [
        {"path": f"/m/{f}.fits", "folder": f, "role": f, "status": "ok", "reason": ""} for f in folders
    ]


def _plan(paths: list[str]) -> list[dict]:
    return [{"frame_id": f"f{i}", "path": p, "status": "ok", "reason": "", "output": f"o{i}.fits"}
            for i, p in enumerate(paths)]  # fmt: skip


def test_summary_counts_failures_apart_from_skips_and_sets_the_exit_status(tmp_path: Path) -> None:
    paths = [f"/n/l{i}.fits" for i in range(4)]
    bug, truncated = "internal error KeyError: 'x'", "calibration failed: truncated"
    calibrate = {"f0": {"status": "calibrated"}, "f1": {"status": "calibrated"},
                 "f2": {"status": "failed", "reason": f"calibration failed: {bug}"},
                 "f3": {"status": "skipped", "reason": truncated}}  # fmt: skip
    publish = {"o0.fits": {"status": "written", "ncombine": 1},
               "o1.fits": {"status": "failed", "reason": "publishing failed: internal error ValueError: v"},
               "o2.fits": {"status": "skipped", "reason": "no calibrated frame",
                           "excluded": {"f2": "not calibrated"}}}  # fmt: skip
    receipts = [{"kind": "calibrate", "items": calibrate}, {"kind": "publish", "items": publish}]
    summary = summarise(_manifest(paths, ("bias", "dark", "flat")), _plan(paths), receipts)
    assert summary["outputs"] == 1 and summary["outputs_failed"] == 1
    assert summary["failed_outputs"] == {"o1.fits": "publishing failed: internal error ValueError: v"}
    assert summary["skipped_outputs"] == {"o2.fits": "no calibrated frame"}
    assert summary["failed_frames"] == [{"file": "/n/l2.fits", "reason": f"calibration failed: {bug}"}]
    assert summary["skipped"] == [{"file": "/n/l3.fits", "reason": truncated}]  # not l2 again
    assert not summary["uncalibrated"] and summary["steps_not_done"] == []
    first = format_summary(summary).splitlines()[0]
    assert "1 outputs written (0 stacked), 1 outputs failed, 1 lights failed, 1 lights skipped" in first

    def exit_status(data: dict) -> int:
        write_json(tmp_path / "summary.json", data)
        return report(tmp_path, 1.0)

    assert exit_status(summary) == EXIT_FAILED
    only_skips = summarise(
        _manifest(paths), _plan(paths), [{"kind": "calibrate", "items": {"f3": calibrate["f3"]}}]
    )
    assert only_skips["outputs_failed"] == 0 and exit_status(only_skips) == EXIT_INCOMPLETE
    assert exit_status(summarise(_manifest(paths), _plan(paths), [])) == EXIT_OK


def test_progress_counts_outputs_written_not_attempted(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    rows = [{"frame_id": f"f{i}", "status": "ok", "output": f"o{i}.fits"} for i in range(4)]
    plan = tmp_path / "work" / "plan.tsv"
    write_tsv(plan, rows, COLUMNS)
    os.utime(plan, (time.time() - 10, time.time() - 10))
    items = {"o0.fits": {"status": "written"}, "o1.fits": {"status": "reused"},
             "o2.fits": {"status": "skipped"}, "o3.fits": {"status": "failed"}}  # fmt: skip
    write_json(tmp_path / "work" / "published" / "p0000.json", {"kind": "publish", "items": items})
    cal = {"f0": {"status": "calibrated"}, "f1": {"status": "failed"}, "f2": {"status": "skipped"}}
    write_json(tmp_path / "work" / "calibrated" / "c0000.json", {"kind": "calibrate", "items": cal})
    assert count_progress(tmp_path, 0.0)[:4] == (1, 4, 2, 4)


def test_the_summary_says_which_calibration_steps_were_not_done() -> None:
    assert calibration_gaps([]) == [
        "no master folder given (-B/-D/-F): the outputs are uncalibrated (bias, dark and flat not applied)"
    ]
    paths = ["/n/a.fits"]
    summary = summarise(_manifest(paths, ("dark",)), _plan(paths), [])
    assert not summary["uncalibrated"]
    assert summary["steps_not_done"] == [
        "no bias folder given (-B): bias not subtracted",
        "no flat folder given (-F): not flat-fielded",
    ]
    assert "  no bias folder given (-B): bias not subtracted" in format_summary(summary).splitlines()


@pytest.mark.parametrize(
    ("cards", "expected"),
    [
        ({"BAYERPAT": "RGGB", "FILTER": "Luminance"}, "RGGB"),
        ({"BAYERPAT": " grbg "}, "GRBG"),
        ({"FILTER": "GBRG", "NAXIS2": 53}, "GBRG"),  # a DSLR program's habit, no BAYERPAT
        ({"FILTER": "GBRG", "NAXIS2": 54}, "RGGB"),  # ... read top-down, rows stored bottom-up
        ({"COLORTYP": "BGGR"}, "BGGR"),
        ({"FILTER": "R"}, None),
        ({"BAYERPAT": "NONE", "FILTER": "V"}, None),
        ({}, None),
    ],
)
def test_cfa_pattern_of_a_header(cards: dict, expected: str | None) -> None:
    assert normalise(cards)["bayerpat"] == expected


def _colour_night(folder: Path) -> None:
    """Five 70×53 lights: three BAYERPAT='RGGB', two of a DSLR with FILTER='GBRG'; no masters."""
    rng = np.random.default_rng(5)
    for i in range(5):
        cards = {"IMAGETYP": "Light", "OBJECT": "M27", "EXPTIME": 6.0, "DATE-OBS": f"2025-05-02T01:0{i}:00"}
        cards |= {"BAYERPAT": "RGGB", "FILTER": "L"} if i < 3 else {"FILTER": "GBRG"}
        write_fits(folder / f"c{i}.fits", rng.normal(1000, 10, (53, 70)), cards, dtype="uint16")


def test_colour_lights_and_no_masters_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _colour_night(tmp_path / "lights")
    out = tmp_path / "out"
    assert run_cli(tmp_path / "lights", out) == EXIT_OK
    assert capsys.readouterr().err.count("imgproc: warning: no master folder given (-B/-D/-F)") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["uncalibrated"] and len(summary["steps_not_done"]) == 1
    colour = sorted((Path(c["file"]).name, c["bayerpat"], c["channels"]) for c in summary["colour"])
    # 53 rows: the DSLR's GBRG, read from the top, starts the stored rows alike
    assert colour == [(f"c{i}.fits", "RGGB" if i < 3 else "GBRG", "B+G+R") for i in range(5)]
    channels = "TR, TG and TB channel frames of 2x2 CFA cells (super-pixels)"
    text = (out / "summary.txt").read_text()
    assert f"  3 colour lights (CFA RGGB as stored) -> {channels}\n" in text
    assert f"  2 colour lights (CFA GBRG as stored) -> {channels}\n" in text
    assert "5 lights, 15 outputs written" in text
    assert "the outputs are uncalibrated (bias, dark and flat not applied)" in text
    assert (
        "INFO imgproc: 3 colour lights (CFA RGGB as stored)" in (out / "logs" / "plan_frames.log").read_text()
    )
    manifest = (out / "work" / "manifest.tsv").read_text().splitlines()
    assert manifest[0].split("\t")[-1] == "bayerpat" and manifest[1].endswith("\tRGGB")
    report = (out / "report.html").read_text()
    notes = report[report.index('<ul id="calibration-notes">') :].split("</ul>")[0]
    assert notes.count("<li>") == 4 and "3 colour lights (CFA RGGB as stored) -&gt; TR, TG and TB" in notes
    assert "no AIRMASS in 5 lights: no target coordinates" in notes  # issue 19: no RA/DEC, no site
    assert "the outputs are uncalibrated" in notes

    assert run_cli(tmp_path / "lights", tmp_path / "plan", "--plan") == EXIT_OK
    plan_text = (tmp_path / "plan" / "plan.txt").read_text()
    assert plan_text.endswith(
        f"2 colour lights (CFA GBRG as stored) -> {channels}\n"
        f"3 colour lights (CFA RGGB as stored) -> {channels}\n"
    )
    assert "M27_TG_6s_1x1" in plan_text and "M27_L_6s_1x1" not in plan_text


def test_format_plan_leaves_mono_nights_alone() -> None:
    paths = ["/n/a.fits"]
    plan = [e | {"sequence": "s", "mid": "2025-01-01T00:00:00", "n_group": 1} for e in _plan(paths)]
    assert "colour" not in format_plan(plan, _manifest(paths))
