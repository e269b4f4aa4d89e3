"""Whole-run progress lines of the imgproc command."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import master_flags, run_cli

import imgproc.cli
from imgproc.cli import EXIT_OK
from imgproc.manifest import write_tsv
from imgproc.plan import COLUMNS
from imgproc.progress import Counts, count_progress, format_progress, time_left
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
    # outputs weigh the frames they are made of (2 each here): 3 + 4 units done of 6 + 6,
    # 6 of them in this run's 10 s
    assert count_progress(tmp_path, since) == Counts(3, 6, 2, 3, 7, 12, 6)
    assert format_progress(Counts(3, 6, 2, 3, 7, 12, 6), 10.0) == (
        "frames 3/6 calibrated, outputs 2/3, 10 s elapsed, ~8 s left"
    )
    assert format_progress(Counts(3, 6, 2, 3, 7, 12, 6), 10.0, short=True) == (
        "frames 3/6, outputs 2/3, 10 s, ~8 s left"
    )
    assert "left" not in format_progress(Counts(6, 6, 3, 3, 12, 12, 6), 30.0)
    assert "left" not in format_progress(Counts(3, 6, 0, 3, 3, 12, 0), 1.0)  # no pace yet


def test_time_left_holds_while_stacking(tmp_path: Path) -> None:
    """24 frames calibrated in 12 s, then 2 stacks of 12 frames, the first done at 18 s: ~6 s
    are left, not the ~1 s that counting a stack like a calibrated frame gives."""
    rows = [
        {"frame_id": f"f{i}", "status": "ok", "output": f"s{i // 12}.fits", "pub_kind": "stack"}
        for i in range(24)
    ]
    (tmp_path / "work").mkdir()
    write_tsv(tmp_path / "work" / "plan.tsv", rows, COLUMNS)
    since = time.time() - 60
    os.utime(tmp_path / "work" / "plan.tsv", (since, since))
    for i in range(24):
        write_json(tmp_path / "work" / "cal" / f"f{i}.json", {})
    write_json(tmp_path / "work" / "published" / "p0000.json", {"items": {"s0.fits": {"status": "ok"}}})
    counts = count_progress(tmp_path, since)
    assert counts == Counts(24, 24, 1, 2, 36, 48, 36)
    assert time_left(counts, 18.0) == pytest.approx(6.0)
    # hard links cost nothing: a calibrate-only night is paced by its frames alone
    for row in rows:
        row["pub_kind"] = "link"
    write_tsv(tmp_path / "work" / "plan.tsv", rows, COLUMNS)
    os.utime(tmp_path / "work" / "plan.tsv", (since, since))
    assert count_progress(tmp_path, since)[4:] == (24, 24, 24)


def test_a_run_prints_whole_night_progress(night, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(imgproc.cli, "PROGRESS_SECONDS", 0.2)
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    err = capsys.readouterr().err
    n = len(night.lights)
    assert f"imgproc: frames {n}/{n} calibrated, outputs {n}/{n}" in err  # capsys: not a terminal
    # a resumed run (one output lost) ends on the whole night done, not on its own share of it
    next(out.glob("*.fits")).unlink()
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    last = [line for line in capsys.readouterr().err.splitlines() if line.startswith("imgproc: frames")][-1]
    assert last.startswith(f"imgproc: frames {n}/{n} calibrated, outputs {n}/{n},") and "left" not in last
