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


def test_progress_counts_the_work_done_for_this_plan_and_times_only_this_run(tmp_path: Path) -> None:
    assert count_progress(tmp_path, 0.0) is None  # no plan yet
    rows = [{"frame_id": f"f{i}", "status": "ok", "output": f"o{i // 2}.fits"} for i in range(6)]
    (tmp_path / "work").mkdir()
    plan = tmp_path / "work" / "plan.tsv"
    write_tsv(plan, rows, COLUMNS)
    since = time.time() + 5  # this run started after the plan was made (a resumed run)
    os.utime(plan, (since - 30, since - 30))

    def stamp(name: str, mtime: float, content: dict | None = None) -> None:
        path = tmp_path / "work" / name
        write_json(path, content or {})
        os.utime(path, (mtime, mtime))

    stamp("cal/f0.json", since - 60)  # older than the plan: made for another plan
    stamp("cal/f3.json", since - 10)  # made for this plan by the interrupted run
    stamp("cal/f1.json", since + 1)  # this run's work
    stamp("cal/f2.json", since + 1)
    stamp("published/p0000.json", since + 1, {"kind": "publish", "items": {"o0.fits": {}, "o1.fits": {}}})
    assert count_progress(tmp_path, since) == (3, 6, 2, 3, 4)
    # 4 items in this run's 10 s, 4 left: ~10 s, not paced by the interrupted run's work
    assert format_progress((3, 6, 2, 3, 4), 10.0) == (
        "imgproc: frames 3/6 calibrated, outputs 2/3, 10 s elapsed, ~10 s left"
    )
    assert "left" not in format_progress((6, 6, 3, 3, 2), 30.0)
    assert "left" not in format_progress((3, 6, 0, 3, 0), 1.0)  # no pace yet


def test_a_run_prints_whole_night_progress(night, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(imgproc.cli, "PROGRESS_SECONDS", 0.2)
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    err = capsys.readouterr().err
    n = len(night.lights)
    assert f"imgproc: frames {n}/{n} calibrated, outputs {n}/{n}" in err
    # a resumed run (one output lost) ends on the whole night done, not on its own share of it
    next(out.glob("*.fits")).unlink()
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    last = [line for line in capsys.readouterr().err.splitlines() if line.startswith("imgproc: frames")][-1]
    assert last.startswith(f"imgproc: frames {n}/{n} calibrated, outputs {n}/{n},") and "left" not in last
