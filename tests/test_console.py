"""What the imgproc command prints: through a pipe (plain lines) and on a terminal (a live bar)."""

from __future__ import annotations

import os
import pty
import sys
from pathlib import Path

import pytest
from conftest import REPO, master_flags, run_cli_process

from imgproc.cli import EXIT_INCOMPLETE, EXIT_OK
from imgproc.console import SNAKEMAKE_LOG, noteworthy
from imgproc.synth import NightSpec, make_night


def run_on_terminal(*args: str | Path, timeout: float = 300) -> tuple[int, str]:
    """Run ``python imgproc.py ...`` on a pseudo-terminal; its exit status and everything it wrote."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        os.execve(sys.executable, [sys.executable, str(REPO / "imgproc.py"), *map(str, args)], os.environ)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode("utf-8", "replace")


def test_a_120_frame_night_through_a_pipe_prints_at_most_15_lines(tmp_path: Path) -> None:
    night = make_night(tmp_path / "night", NightSpec(n_lights=60, shape=(40, 56), n_stars=8))
    broken = night.root / "lights" / "zz_broken.fits"
    broken.write_bytes(night.lights[0].read_bytes()[:5000])
    out = tmp_path / "out"
    result = run_cli_process(night.root / "lights", out, *master_flags(night))
    assert result.returncode == EXIT_INCOMPLETE, result.stderr
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) <= 15, "\n".join(lines)
    assert lines[0].startswith("imgproc: 121 FITS files in") and "calibrate (bias, dark, flat)" in lines[0]
    # the warning as it happened, then the progress, the summary and where the outputs are
    warning = next(i for i, line in enumerate(lines) if line.startswith("imgproc: warning: skipped"))
    assert "zz_broken.fits" in lines[warning]
    progress = [i for i, line in enumerate(lines) if line.startswith("imgproc: frames")]
    assert progress and lines[progress[-1]].startswith("imgproc: frames 120/120 calibrated, outputs 120/120")
    assert any(line.startswith("imgproc 0.1.0: 121 lights, 120 outputs written") for line in lines)
    assert lines[-1].startswith("imgproc: finished in ") and str(out) in lines[-1]
    assert not any("Finished jobid" in line or "INFO imgproc" in line for line in lines)
    # Snakemake's own log is kept in full
    log = (out / SNAKEMAKE_LOG).read_text()
    assert log.count("Finished jobid") >= 5 and "INFO imgproc" in log


def test_on_a_terminal_the_progress_is_a_live_bar(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    status, printed = run_on_terminal(night.root / "lights", out, *master_flags(night))
    assert status == EXIT_OK, printed
    n = len(night.lights)
    # tqdm redraws one line with carriage returns; it ends full, with the whole night done
    bar = [part for part in printed.replace("\r\n", "\n").split("\r") if part.startswith("imgproc: █")]
    assert bar and f"frames {n}/{n}, outputs {n}/{n}" in bar[-1].splitlines()[0]
    lines = printed.replace("\r", "\n").split("\n")
    assert lines[0].startswith(f"imgproc: {n} FITS files in")
    assert not any(line.startswith("imgproc: frames") for line in lines)  # no plain progress lines
    assert any(line.startswith("imgproc: finished in") for line in lines)
    assert "Finished jobid" not in printed and (out / SNAKEMAKE_LOG).is_file()


def test_verbose_shows_snakemakes_log(night, tmp_path: Path) -> None:
    result = run_cli_process(night.root / "lights", tmp_path / "out", *master_flags(night), "-v")
    assert result.returncode == EXIT_OK, result.stderr
    assert "Finished jobid" in result.stderr and "INFO imgproc" in result.stderr


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("WARNING imgproc: skipped a.fits: unreadable", True),
        ("ERROR imgproc: a.fits: calibration failed: internal error", True),
        ("Error in rule calibrate_batch:", True),
        ("SLURM run ID: 0f1e", True),
        ("Nothing to be done (all requested files are present and up to date).", True),
        ("INFO imgproc: calibrate c0001: 8/8 done, 1 s elapsed, ~0 s left", False),
        ("INFO imgproc: a.fits: no error", False),
        ("Finished jobid: 3 (Rule: calibrate_batch)", False),
        ("[Thu Dec  3 07:09:02 2026]", False),
        ("    reason: Params have changed since last execution: {'manifest': ['path', 'error']}", False),
        ("    log: logs/calibrate/c0001.log (check log file(s) for error details)", False),
    ],
)
def test_only_warnings_and_errors_of_snakemakes_log_are_shown(line: str, shown: bool) -> None:
    assert noteworthy(line) is shown
