"""How the plan becomes Snakemake jobs: input lists, params and resources of each batch rule.

Imported by ``rules/common.smk`` at parse time, so it imports no astropy and reads only the
plan table (never a FITS header).  Everything here is a plain function of config and plan.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from imgproc.limits import held_bytes
from imgproc.manifest import COLUMNS as MANIFEST_COLUMNS
from imgproc.manifest import OK, list_fits, output_conflict, read_tsv, shown, watchable
from imgproc.masters import COLUMNS as MASTER_COLUMNS
from imgproc.plan import BEST
from imgproc.plan import COLUMNS as PLAN_COLUMNS

ROLES = ("bias", "dark", "flat")
_SNAKEMAKE_SYNTAX = re.compile(r"[{}<>]")
#: Frame-sized float32 arrays a calibrate or publish job holds at once (light, result, 3
#: masters...); a frame too big to hold whole counts as :func:`~imgproc.limits.held_bytes`.
_CAL_ARRAYS = 8
_OVERHEAD_MB = 400
#: Priority of calibrate jobs: below hard-link publish jobs, above aligning and stacking ones
#: (:meth:`WorkflowInputs.publish_priority`).
CALIBRATE_PRIORITY = 1


class Layout:
    """Config-derived facts: input folders and the params of the scan, plan and publish rules."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.input_dir = Path(config["input_dir"])
        self.master_dirs = {r: Path(config[f"{r}_dir"]) for r in ROLES if config.get(f"{r}_dir")}
        self.exclude = [Path(config["output_dir"])] if config.get("output_dir") else []
        conflict = output_conflict(self.exclude[0], self.input_dir, self.master_dirs) if self.exclude else ""
        if conflict:  # plain Snakemake checks its config as the imgproc command does
            raise ValueError(f"config output_dir: {conflict}")

    @functools.cached_property
    def _listing(self) -> tuple[list[str], list[str]]:
        """Paths of every FITS name of the input and master folders: (watchable, the others)."""
        folders = [self.input_dir, *self.master_dirs.values()]
        missing = [str(folder) for folder in folders if not folder.is_dir()]
        if missing:
            raise FileNotFoundError(f"not a folder: {', '.join(missing)}")
        found = [path for folder in folders for path in list_fits(folder, self.exclude)]
        watched = trackable(str(path) for path in found if watchable(path))
        kept = set(watched)
        return watched, [shown(path) for path in found if str(path) not in kept]

    def input_files(self) -> list[str]:
        """Every FITS file of the input and master folders and their subfolders, the output
        folder left out (names only, no header read).

        These are the scan's inputs only so that Snakemake rescans when files come, go or
        change. The others (:func:`trackable` names, and what is not :func:`watchable`:
        unreadable files, FIFOs, dangling links, folders) are in :meth:`scan_params` instead,
        so that the scan still reads or reports them and runs again when one comes or goes.
        """
        return self._listing[0]

    @staticmethod
    def table_columns(*tables: str) -> dict[str, list[str]]:
        """The columns of the named work tables (``manifest``, ``plan``, ``masters``): a param of
        the rule that writes them, so that a table written by a version of imgproc with other
        columns is made again (Snakemake reruns a job whose params changed)."""
        columns = {"manifest": MANIFEST_COLUMNS, "plan": PLAN_COLUMNS, "masters": MASTER_COLUMNS}
        return {table: list(columns[table]) for table in tables}

    def scan_params(self) -> dict[str, Any]:
        """What the scan depends on besides the files themselves."""
        return {
            "light_dir": str(self.input_dir),
            "master_dirs": {role: str(path) for role, path in self.master_dirs.items()},
            "keywords": dict(self.config["keywords"]),
            "filter": self.config.get("filter"),
            "exclude": [str(path) for path in self.exclude],
            "max_frame_bytes": self.config["limits"]["max_frame_mb"] * 1024**2,
            "unwatched": self._listing[1],
        }

    def plan_params(self) -> dict[str, Any]:
        """Settings of :class:`imgproc.plan.PlanSettings`."""
        matching = self.config["matching"]
        return {
            "observer": self.config["observer"],
            "object_name": self.config.get("object"),
            "stack": self.config["stack"],
            "stack_threshold": self.config["stack_threshold"],
            "binning": self.config["bin"],
            "align": self.config["align"],
            "roles": sorted(self.master_dirs),
            "reference": self.config["alignment"]["reference"],
            "batches": self.config["batches"],
            "min_batch": self.config["min_batch"],
            "max_batch": self.config["max_batch"],
            "criteria": {role: list(matching[role]) for role in ROLES},
            "tolerance": dict(matching["tolerance"]),
            "dark_scaling": matching["dark_scaling"],
            "min_master_frames": self.config["masters"]["min_frames"],
            "prefer_finished": self.config["masters"]["prefer_finished"],
            "colour_output": self.config.get("colour", {}).get("output", "channels"),
            "cfa": self.config.get("colour", {}).get("pattern", "auto"),
        }

    def stack_params(self) -> dict[str, Any]:
        """Settings of :class:`imgproc.publish.StackSettings`."""
        stacking, alignment = self.config["stacking"], self.config["alignment"]
        return {
            "align": self.config["align"],
            "method": stacking["method"],
            "normalize": stacking["normalize"],
            "weighting": stacking["weighting"],
            "reference": alignment["reference"],
            "sigma_low": stacking["sigma_low"],
            "sigma_high": stacking["sigma_high"],
            "memory_budget": stacking["memory_budget_mb"] * 1024**2,
            "upsample": alignment["upsample"],
            "min_significance": alignment["min_significance"],
            "kernel": alignment["kernel"],
            "registration": alignment["method"],
            "model": alignment["model"],
            "reject_fwhm_ratio": self.config["quality"]["fwhm_ratio"],
            "reject_stars_ratio": self.config["quality"]["stars_ratio"],
            "reject_roundness_drop": self.config["quality"]["roundness_drop"],
        }


class WorkflowInputs:
    """Input functions over the plan; ``plan_outputs`` resolves the checkpoint (it raises while
    the plan is still to be made, which is how Snakemake defers these jobs) to its outputs
    ``plan`` and ``masters``."""

    def __init__(self, layout: Layout, plan_outputs: Callable[[], Any]) -> None:
        self.layout = layout
        self._plan_outputs = plan_outputs
        self._cache: dict[str, tuple[tuple[int, int], list[dict]]] = {}

    def _table(self, name: str) -> list[dict[str, Any]]:
        """Rows of a checkpoint table with status ok (read once per parse and table version)."""
        path = getattr(self._plan_outputs(), name)
        stat = os.stat(path)
        key = (stat.st_mtime_ns, stat.st_size)
        if name not in self._cache or self._cache[name][0] != key:
            self._cache[name] = (key, [row for row in read_tsv(Path(path)) if row["status"] == OK])
        return self._cache[name][1]

    def plan(self) -> list[dict[str, Any]]:
        """Plan rows of the lights to process."""
        return self._table("plan")

    def masters(self) -> list[dict[str, Any]]:
        """Masters to build from raw calibration frames."""
        return self._table("masters")

    def built_masters(self, wildcards: Any = None) -> list[str]:
        """Every master to build (relative paths, as the build rule's outputs)."""
        return [row["path"] for row in self.masters()]

    def _master(self, name: str) -> dict[str, Any]:
        return next(row for row in self.masters() if Path(row["path"]).stem == name)

    def master_inputs(self, wildcards: Any) -> dict[str, list[str]]:
        """Raw frames of a master and the masters they are corrected with."""
        master = self._master(wildcards.master)
        return {
            "frames": trackable(master["members"].split(";")),
            "corrections": [master[role] for role in ("bias", "dark") if master.get(role)],
        }

    def master_entry(self, wildcards: Any) -> dict[str, Any]:
        """The planned master (also a params rerun trigger)."""
        return _entry(self._master(wildcards.master), MASTER_COLUMNS)

    def master_mem_mb(self, wildcards: Any, attempt: int = 1) -> int:
        """Memory of a master build: the combining budget plus the correction frames."""
        master = self._master(wildcards.master)
        budget = self.layout.config["stacking"]["memory_budget_mb"]
        return attempt * (_OVERHEAD_MB + budget + master["ny"] * master["nx"] * 4 * 3 // 1024**2)

    def master_runtime(self, wildcards: Any, attempt: int = 1) -> int:
        """Wall-time limit (minutes) of a master build."""
        master = self._master(wildcards.master)
        return attempt * _runtime([master] * master["n_frames"], 0.1)

    def _members(self, column: str, batch: str) -> list[dict[str, Any]]:
        return [row for row in self.plan() if row[column] == batch]

    def all_receipts(self, wildcards: Any = None) -> list[str]:
        """Receipts of every calibrate and publish batch."""
        plan = self.plan()
        cal = sorted({row["cal_batch"] for row in plan})
        pub = sorted({row["pub_batch"] for row in plan})
        return [f"work/calibrated/{b}.json" for b in cal] + [f"work/published/{b}.json" for b in pub]

    def calibrate_inputs(self, wildcards: Any) -> dict[str, list[str]]:
        """The masters the batch's lights use.

        The lights themselves are not inputs: their sizes and modification times are in the
        plan rows (:meth:`calibrate_entries`), and Snakemake would otherwise look up the size of
        every light of every ready batch on each scheduling round (about a second of the
        scheduler's time for 300 lights). A light that vanished after the scan is then skipped
        with its reason, like any unreadable one, instead of failing the whole batch.
        """
        members = self._members("cal_batch", wildcards.cal_batch)
        return {"masters": sorted({row[role] for row in members for role in ROLES if row.get(role)})}

    def calibrate_entries(self, wildcards: Any) -> list[dict[str, Any]]:
        """Plan rows of the batch (also a params rerun trigger: any change redoes the batch,
        including a light's new size or modification time)."""
        return [_entry(row) for row in self._members("cal_batch", wildcards.cal_batch)]

    def calibrate_mem_mb(self, wildcards: Any, attempt: int = 1) -> int:
        """Memory of a calibrate job: a handful of frame-sized float32 arrays (more on a retry)."""
        return attempt * (_OVERHEAD_MB + _frames_mb(self._members("cal_batch", wildcards.cal_batch)))

    def calibrate_runtime(self, wildcards: Any, attempt: int = 1) -> int:
        """Wall-time limit (minutes) of a calibrate job, generous: ~6 s per 4-megapixel frame."""
        return attempt * _runtime(self._members("cal_batch", wildcards.cal_batch), 0.1)

    def publish_runtime(self, wildcards: Any, attempt: int = 1) -> int:
        """Wall-time limit (minutes) of a publish job (alignment and stacking: ~30 s per frame)."""
        return attempt * _runtime(self._members("pub_batch", wildcards.pub_batch), 0.5)

    def _reference_rows(self, members: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Plan rows the members may be aligned to: their references (a colour channel frame's is
        its reference light's green frame), or with ``reference: best`` every light of their
        sequences (the best is chosen once they are measured) and those lights' green frames."""
        refs = {row["reference"] for row in members if row.get("reference")}
        if self.layout.config["alignment"]["reference"] != BEST:
            return [row for row in self.plan() if row["frame_id"] in refs]
        sequences = {row["sequence"] for row in members if row.get("reference")}
        candidates = [
            row for row in self.plan()
            if row.get("reference") and row["status"] == OK and row["sequence"] in sequences
        ]  # fmt: skip
        ids = {row["frame_id"] for row in candidates}
        greens = {row["measure"] for row in candidates if row.get("measure")} - ids
        return candidates + [row for row in self.plan() if row["frame_id"] in greens]

    def publish_inputs(self, wildcards: Any) -> list[str]:
        """Receipts of the calibrate batches holding the batch's frames, the frames they may be
        aligned to (:meth:`_reference_rows`) and the green frames a colour channel frame (and its
        reference) is registered by."""
        members = self._members("pub_batch", wildcards.pub_batch)
        rows = [*members, *self._reference_rows(members)]
        measured = {row["measure"] for row in rows if row.get("reference") and row.get("measure")}
        batches = {row["cal_batch"] for row in rows}
        batches |= {row["cal_batch"] for row in self.plan() if row["frame_id"] in measured}
        return [f"work/calibrated/{batch}.json" for batch in sorted(batches)]

    def publish_entries(self, wildcards: Any) -> list[dict[str, Any]]:
        """Plan rows of the publish batch."""
        return [_entry(row) for row in self._members("pub_batch", wildcards.pub_batch)]

    def publish_references(self, wildcards: Any) -> dict[str, dict[str, Any]]:
        """Plan rows of the reference frames the batch may align to (see :meth:`_reference_rows`)."""
        members = self._members("pub_batch", wildcards.pub_batch)
        return {row["frame_id"]: _entry(row) for row in self._reference_rows(members)}

    def publish_threads(self, cores: int) -> Callable[[Any], int]:
        """Threads of a publish job: the ``cores`` spread over the publish batches that align or
        stack, so that a night of one big stack registers and combines on every core, and a
        night of many small groups runs one single-threaded job per core; one for hard links."""

        def threads(wildcards: Any) -> int:
            heavy = {
                row["pub_batch"] for row in self.plan() if row["pub_batch"] and row["pub_kind"] != "link"
            }
            if wildcards.pub_batch not in heavy:  # hard links: one thread is plenty
                return 1
            return max(1, cores // len(heavy))

        return threads

    def publish_priority(self, wildcards: Any) -> int:
        """Scheduling priority of a publish job, against :data:`CALIBRATE_PRIORITY`.

        Hard links of a calibrated batch go first: they take milliseconds and put the night's
        outputs in place as it runs. Aligning and stacking jobs go last: calibrating every
        batch first (a fraction of the work) makes them all ready at once, so that short
        stack jobs keep every core busy to the end instead of a long one running alone.
        """
        members = self._members("pub_batch", wildcards.pub_batch)
        return 10 if all(row["pub_kind"] == "link" for row in members) else 0

    def publish_mem_mb(self, wildcards: Any, attempt: int = 1) -> int:
        """Memory of a publish job: the stacking budget plus a few frames (alignment FFTs)."""
        budget = self.layout.config["stacking"]["memory_budget_mb"]
        return attempt * (_OVERHEAD_MB + budget + _frames_mb(self._members("pub_batch", wildcards.pub_batch)))


def _frames_mb(rows: Iterable[Mapping[str, Any]]) -> int:
    """MiB of the frame-sized arrays of a job over ``rows`` (frames with ny, nx)."""
    return max((held_bytes((row["ny"], row["nx"])) for row in rows), default=0) * _CAL_ARRAYS // 1024**2


def _runtime(rows: Iterable[Mapping[str, Any]], minutes_per_4mp: float) -> int:
    """Minutes for a job over ``rows`` (frames with ny, nx): 10 plus a per-frame allowance."""
    megapixels = sum(row["ny"] * row["nx"] for row in rows) / 4e6
    return 10 + math.ceil(megapixels * minutes_per_4mp)


def trackable(paths: Iterable[str]) -> list[str]:
    """Paths Snakemake can take as inputs: names it would read as wildcards or path variables
    (``{}``, ``<>``) are left out, and so are names with a control character (a newline breaks
    its lock files) or bytes that are not UTF-8 (it cannot write them).  Such files are still
    processed (jobs get every path through their params, which also trigger reruns); only
    their modification times go unwatched."""
    return [path for path in paths if not _SNAKEMAKE_SYNTAX.search(path) and shown(path) == path]


def _entry(row: Mapping[str, Any], columns: Iterable[str] = PLAN_COLUMNS) -> dict[str, Any]:
    return {column: row.get(column) for column in columns}
