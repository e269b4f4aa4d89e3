"""What a run may touch and how it ends (issue 18): SIGTERM stops the jobs and the run (exit
143, lock released), and nothing is written outside the output folder, home included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, master_flags, run_cli, sha256_tree

from imgproc.cli import EXIT_OK, EXIT_TERMINATED, hold_run_lock, live_snakemake_in


def _command(night, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "imgproc.py"), str(night.root / "lights"), str(out),
            *master_flags(night), *extra]  # fmt: skip


def test_sigterm_stops_the_jobs_releases_the_lock_and_exits_143(night, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert run_cli(night.root / "lights", reference, *master_flags(night), "-a", "-s", "-S", "2") == EXIT_OK
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _command(night, out, "-a", "-s", "-S", "2", "-c", "1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list((out / "work").glob("*.tsv")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the imgproc process only, as a service manager does
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_TERMINATED, stderr[-2000:]
    assert "imgproc: stopped by SIGTERM; run the same command again to finish" in stderr
    assert not live_snakemake_in(out.resolve())  # no Snakemake left writing unattended
    hold_run_lock(out).close()  # the lock is free
    assert run_cli(night.root / "lights", out, *master_flags(night), "-a", "-s", "-S", "2") == EXIT_OK
    assert sha256_tree(out) == sha256_tree(reference)


def test_a_run_writes_nothing_in_the_home_folder(night, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("XDG_")}
    result = subprocess.run(
        _command(night, tmp_path / "out"), env={**env, "HOME": str(home)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == EXIT_OK, result.stderr[-2000:]
    assert list(home.rglob("*")) == []
    assert not (tmp_path / "out" / ".snakemake" / "cache").exists()


def test_outputs_of_an_earlier_stack_threshold_are_moved_aside(night, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    assert run_cli(night.root / "lights", fresh, *master_flags(night), "-s", "-S", "4") == EXIT_OK
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-s", "-S", "2") == EXIT_OK
    earlier = sha256_tree(out)
    assert set(earlier).isdisjoint(sha256_tree(fresh))  # other groups, other names
    assert run_cli(night.root / "lights", out, *master_flags(night), "-s", "-S", "4") == EXIT_OK
    assert sha256_tree(out) == sha256_tree(fresh)
    assert sha256_tree(out / "superseded") == earlier
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["superseded"] == sorted(earlier) and summary["complete"]
    text = (out / "summary.txt").read_text(encoding="utf-8")
    assert f"  {len(earlier)} outputs of earlier settings are in superseded/" in text


def test_outputs_of_lights_left_out_by_a_filter_stay(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    every = sha256_tree(out)
    assert run_cli(night.root / "lights", out, *master_flags(night), "-f", "V") == EXIT_OK
    assert sha256_tree(out) == every
    assert not (out / "superseded").exists()
