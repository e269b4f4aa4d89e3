"""Whole-run progress lines of the imgproc command."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import master_flags, run_cli

import imgproc.cli
from imgproc.cli import EXIT_OK
from imgproc.manifest import write_tsv
from imgproc.plan import COLUMNS
from imgproc.progress import count_progress, format_progress
from imgproc.stamps import write_json


def test_count_progress_counts_only_this_runs_work(tmp_path: Path) -> None:
    assert count_progress(tmp_path, 0.0) is None  # no plan yet
    rows = [{"frame_id": f"f{i}", "status": "ok", "output": f"o{i // 2}.fits"} for i in range(6)]
    (tmp_path / "work").mkdir()
    write_tsv(tmp_path / "work" / "plan.tsv", rows, COLUMNS)
    old = tmp_path / "work" / "cal" / "f0.json"
    write_json(old, {})
    since = time.time() + 5  # the run "started" after f0 was made: f0 does not count
    os.utime(old, (since - 60, since - 60))
    for fid in ("f1", "f2"):
        write_json(tmp_path / "work" / "cal" / f"{fid}.json", {})
        os.utime(tmp_path / "work" / "cal" / f"{fid}.json", (since + 1, since + 1))
    receipt = tmp_path / "work" / "published" / "p0000.json"
    write_json(receipt, {"kind": "publish", "items": {"o0.fits": {}, "o1.fits": {}}})
    os.utime(receipt, (since + 1, since + 1))
    assert count_progress(tmp_path, since) == (2, 6, 2, 3)
    assert format_progress((2, 6, 2, 3), 10.0) == (
        "imgproc: frames 2/6 calibrated, outputs 2/3, 10 s elapsed, ~12 s left"
    )
    assert "left" not in format_progress((6, 6, 3, 3), 30.0)


def test_a_run_prints_whole_night_progress(night, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(imgproc.cli, "PROGRESS_SECONDS", 0.2)
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    err = capsys.readouterr().err
    n = len(night.lights)
    assert f"imgproc: frames {n}/{n} calibrated, outputs {n}/{n}" in err
