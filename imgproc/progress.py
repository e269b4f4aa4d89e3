"""Progress lines: of one batch job, and of a whole run (frames calibrated and outputs made out
of the plan's totals).

The ``imgproc`` command watches the output folder while Snakemake works (jobs in separate
processes or on cluster nodes leave stamps and receipts there) and shows how far the night has
got, with an estimate of the time left: a live bar on a terminal, a plain line every few seconds
in a pipe or a log file.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple, TextIO

from tqdm import tqdm

from imgproc.manifest import FAILED, OK, SKIPPED, read_tsv
from imgproc.stamps import read_json

log = logging.getLogger("imgproc")
#: Seconds between redraws of the progress bar on a terminal.
BAR_SECONDS = 0.5


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


class Counts(NamedTuple):
    """How far a run has got (:func:`count_progress`). Work is counted in frames: calibrating a
    frame is one unit, making an aligned or stacked output one unit per frame in it (a stack of
    12 frames weighs 12), publishing a hard link nothing. So the pace measured while frames were
    calibrated still holds while the stacks are made."""

    frames_done: int
    frames: int
    outputs_done: int
    outputs: int
    units_done: int
    units: int
    units_this_run: int


def count_progress(output: Path, since: float) -> Counts | None:
    """How far the run that started at ``since`` (a time.time() value) has got; None while
    there is no plan yet.

    Work is done once its stamp or receipt is newer than the plan: a run resumed after a crash
    starts from what the interrupted one finished, and a run whose plan changed (written anew)
    from nothing. Only this run's own work measures its pace (``units_this_run``).
    """
    plan_path = output / "work" / "plan.tsv"
    try:
        planned = plan_path.stat().st_mtime
    except OSError:
        return None
    plan = [row for row in read_tsv(plan_path) if row["status"] == OK]
    calibrated, published = _finished(output / "work")
    frames = {row["frame_id"] for row in plan}
    weight: dict[str, int] = {}
    for row in plan:
        weight[row["output"]] = weight.get(row["output"], 0) + (row.get("pub_kind") != "link")
    frames_done = [t for t in map(calibrated.get, frames) if t is not None and t >= planned]
    outputs_done = {name: published[name] for name in weight if published.get(name, 0.0) >= planned}
    this_run = sum(t >= since for t in frames_done)
    this_run += sum(weight[name] for name, t in outputs_done.items() if t >= since)
    units_done = len(frames_done) + sum(weight[name] for name in outputs_done)
    return Counts(
        len(frames_done), len(frames), len(outputs_done), len(weight),
        units_done, len(frames) + sum(weight.values()), this_run,
    )  # fmt: skip


def time_left(counts: Counts, elapsed: float) -> float | None:
    """Seconds left at this run's pace, or None before this run did any work."""
    if not counts.units_this_run or counts.units_done >= counts.units:
        return None
    return elapsed / counts.units_this_run * (counts.units - counts.units_done)


def format_progress(counts: Counts, elapsed: float, short: bool = False) -> str:
    """``frames 120/300 calibrated, outputs 40/300, 25 s elapsed, ~40 s left`` (without the
    ``imgproc:`` prefix); ``short``: ``frames 120/300, outputs 40/300, 25 s, ~40 s left``, beside
    a bar."""
    left = time_left(counts, elapsed)
    estimate = "" if left is None else f", ~{left:.0f} s left"
    frames, seconds = ("", "") if short else (" calibrated", " elapsed")
    counted = (
        f"frames {counts.frames_done}/{counts.frames}{frames}, outputs {counts.outputs_done}/{counts.outputs}"
    )
    return f"{counted}, {elapsed:.0f} s{seconds}{estimate}"


class ProgressMonitor(threading.Thread):
    """Shows the run's progress until stopped: on a terminal a live bar (tqdm) redrawn every
    :data:`BAR_SECONDS`, elsewhere (a pipe, a log file) a plain line every ``interval`` seconds
    when something changed. :meth:`say` prints a line without breaking the bar."""

    def __init__(
        self, output: Path, interval: float = 10.0, stream: TextIO | None = None, bar: bool | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.output, self.stream = output, stream or sys.stderr
        self.live = self.stream.isatty() if bar is None else bar
        self.interval = BAR_SECONDS if self.live else interval
        self.started_wall, self.started = time.time(), time.monotonic()
        self._finished = threading.Event()
        self._last = ""
        self._bar: tqdm | None = None

    def run(self) -> None:
        while not self._finished.wait(self.interval):
            self.report()

    def say(self, text: str) -> None:
        """Print ``text`` as a line of its own (above the bar, on a terminal)."""
        if self.live:
            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def report(self, final: bool = False) -> None:
        """Show the progress: redraw the bar, or print a line if anything changed since the
        last one (the ``final`` one without an estimate: what is not done by then, failed or
        skipped, will not be)."""
        try:
            counts = count_progress(self.output, self.started_wall - 1.0)
        except (OSError, ValueError):
            return
        if counts is None or counts.frames == 0:
            return
        text = format_progress(counts, time.monotonic() - self.started, short=self.live)
        if final:
            text = text.split(", ~")[0]
        if self.live:
            self._draw(counts, text)
        elif text.split(", ~")[0] != self._last.split(", ~")[0]:
            print(f"imgproc: {text}", file=self.stream, flush=True)
            self._last = text

    def _draw(self, counts: Counts, text: str) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=counts.units,
                file=self.stream,
                bar_format="imgproc: {bar:20} {desc}",
                ncols=80,
                nrows=24,
            )
        self._bar.total, self._bar.n = counts.units, counts.units_done
        self._bar.ncols = self._columns()
        self._bar.set_description_str(text, refresh=True)

    def _columns(self) -> int:
        """The terminal's width (80 where it says 0, as a new pseudo-terminal does)."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            return 80

    def stop(self) -> None:
        """Stop watching, after one last report (the bar stays on screen)."""
        self._finished.set()
        if self.is_alive():
            self.join(timeout=self.interval + 1)
        self.report(final=True)
        if self._bar is not None:
            self._bar.close()
