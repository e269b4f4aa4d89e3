"""Progress lines: of one batch job, and of a whole run (frames calibrated and outputs made out
of the plan's totals).

The ``imgproc`` command watches the output folder while Snakemake works (jobs in separate
processes or on cluster nodes leave stamps and receipts there) and prints one plain line every
few seconds, readable on a terminal and in a log alike, with an estimate of the time left.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from imgproc.manifest import FAILED, OK, SKIPPED, read_tsv
from imgproc.stamps import read_json

log = logging.getLogger("imgproc")


class Progress:
    """Plain progress lines for a batch: done/total and an estimate of the time left, at most
    every ``every`` seconds and at the end (readable on a terminal and in a log file)."""

    def __init__(self, label: str, total: int, every: float = 5.0) -> None:
        self.label, self.total, self.every = label, total, every
        self.start = self.last = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the batch started."""
        return round(time.monotonic() - self.start, 3)

    def step(self, done: int) -> None:
        """Report that ``done`` of ``total`` items are finished."""
        now = time.monotonic()
        if done < self.total and now - self.last < self.every:
            return
        self.last = now
        left = (now - self.start) / done * (self.total - done) if done else 0.0
        log.info("%s: %d/%d done, %.0f s elapsed, ~%.0f s left", self.label, done, self.total,
                 now - self.start, left)  # fmt: skip


def _written(folder: Path) -> list[tuple[Path, float]]:
    """JSON files of ``folder`` with their modification times (time.time() values)."""
    found = []
    for path in folder.glob("*.json") if folder.is_dir() else ():
        try:
            found.append((path, path.stat().st_mtime))
        except OSError:
            continue
    return found


def _finished(work: Path) -> tuple[dict[str, float], dict[str, float]]:
    """When each frame was last calibrated and each output last made, by the newest stamp or
    receipt that says so (a receipt item skipped or failed is not done): {frame id: time},
    {output name: time}."""
    calibrated: dict[str, float] = {}
    published: dict[str, float] = {}

    def note(found: dict[str, float], keys: Iterable[str], mtime: float) -> None:
        for key in keys:
            found[key] = max(mtime, found.get(key, mtime))

    for path, mtime in _written(work / "cal"):
        note(calibrated, [path.stem], mtime)
    for folder, found in (("calibrated", calibrated), ("published", published)):
        for path, mtime in _written(work / folder):
            items = (read_json(path) or {}).get("items", {})
            note(
                found,
                [key for key, item in items.items() if item.get("status") not in (SKIPPED, FAILED)],
                mtime,
            )
    return calibrated, published


def count_progress(output: Path, since: float) -> tuple[int, int, int, int, int] | None:
    """(frames done, frames planned, outputs done, outputs planned, how many of those done the
    run that started at ``since`` did); None while there is no plan yet.

    Work is done once its stamp or receipt is newer than the plan: a run resumed after a crash
    starts from what the interrupted one finished, and a run whose plan changed (written anew)
    from nothing. Only this run's own work measures its pace.
    """
    plan_path = output / "work" / "plan.tsv"
    try:
        planned = plan_path.stat().st_mtime
    except OSError:
        return None
    plan = [row for row in read_tsv(plan_path) if row["status"] == OK]
    calibrated, published = _finished(output / "work")
    frames = {row["frame_id"] for row in plan}
    outputs = {row["output"] for row in plan}
    frames_done = [t for t in map(calibrated.get, frames) if t is not None and t >= planned]
    outputs_done = [t for t in map(published.get, outputs) if t is not None and t >= planned]
    this_run = sum(t >= since for t in frames_done + outputs_done)
    return len(frames_done), len(frames), len(outputs_done), len(outputs), this_run


def format_progress(counts: tuple[int, int, int, int, int], elapsed: float) -> str:
    """``frames 120/300 calibrated, outputs 40/300, 25 s elapsed, ~40 s left``: the estimate from
    the pace of this run's own work (the last of :func:`count_progress`'s counts)."""
    done, total, made, outputs, this_run = counts
    work_left = total + outputs - done - made
    left = elapsed / this_run * work_left if this_run else None
    estimate = f", ~{left:.0f} s left" if left is not None and work_left > 0 else ""
    counts_text = f"frames {done}/{total} calibrated, outputs {made}/{outputs}"
    return f"imgproc: {counts_text}, {elapsed:.0f} s elapsed{estimate}"


class ProgressMonitor(threading.Thread):
    """Prints the run's progress every ``interval`` seconds until stopped."""

    def __init__(self, output: Path, interval: float = 10.0, stream: TextIO | None = None) -> None:
        super().__init__(daemon=True)
        self.output, self.interval, self.stream = output, interval, stream
        self.started_wall, self.started = time.time(), time.monotonic()
        self._finished = threading.Event()
        self._last = ""

    def run(self) -> None:
        while not self._finished.wait(self.interval):
            self.report()

    def report(self, final: bool = False) -> None:
        """Print a progress line if anything changed since the last one (the ``final`` one
        without an estimate: what is not done by then, failed or skipped, will not be)."""
        try:
            counts = count_progress(self.output, self.started_wall - 1.0)
        except (OSError, ValueError):
            return
        if counts is None or counts[1] == 0:
            return
        line = format_progress(counts, time.monotonic() - self.started)
        if final:
            line = line.split(", ~")[0]
        if line.split(", ~")[0] != self._last.split(", ~")[0]:
            print(line, file=self.stream or sys.stderr, flush=True)
            self._last = line

    def stop(self) -> None:
        """Stop watching, after one last line."""
        self._finished.set()
        self.join(timeout=self.interval + 1)
        self.report(final=True)
