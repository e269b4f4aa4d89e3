"""Benchmark: imgproc (through Snakemake) against a lean numpy reference and the ccdproc way.

    python bench/run.py [--frames 300] [--size 2048] [--cores 2] [--data bench/data] [--quick]

See bench/README.md for what is measured and how.  Every method runs as a child process of
this script: wall time, CPU time (user+sys of the children, from getrusage deltas) and peak
RSS of the process tree (sampled from /proc every 50 ms) are measured the same way for all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BASELINES = BENCH / "baselines.py"
METHODS = ("imgproc", "reference", "ccdproc")
MODES = {"calibrate": [], "stack": ["-s", "-S", "20", "-a"]}
#: One aligned stack of each filter's lights (bench.big_stack: the memory budget's case).
BIG_STACK = ["-s", "-S", "1", "-a"]
STACK_THRESHOLD = 20
STACK_BUDGET_MIB = 2048  # config.yaml stacking.memory_budget_mb
#: What imgproc may use beyond its budget, summed over its processes: interpreters, libraries,
#: Snakemake's DAG and the frames in flight outside the stacks (the targets' margin).
MEMORY_MARGIN_MIB = 300
#: The big-sensor case (issue 23): nights of an IMX455's frames, (ny, nx), in every mode, with
#: stacking.memory_budget_mb at each of BIG_BUDGETS_MIB. Its stacks are one per filter (-S 1).
#: Aligned, imgproc registers on the first light of each filter, as the reference does, so that
#: their outputs can be compared (its default, the sharpest frame, moves every output).
BIG_SHAPE = (6388, 9576)
FIRST = ["-a", "--set", "alignment.reference=first"]
BIG_MODES = {
    "calibrate": [], "bin2": ["-b", "2"], "align": FIRST, "stack": ["-s", "-S", "1"],
    "stack-align": ["-s", "-S", "1", *FIRST],
}  # fmt: skip
BIG_BUDGETS_MIB = (2048, 1024)
BIG_RATIO = 1.1  # imgproc wall / reference, the big-sensor target
# What the imgproc command sets for Snakemake; the baselines' pool workers get the same, so no
# method runs idle BLAS threads (the registration pins BLAS to one thread itself).
ONE_THREAD = {
    key: "1"
    for key in ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
}  # fmt: skip
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = 1024**2


# --- generated nights ------------------------------------------------------------------------


def night_params(
    frames: int,
    size: int | tuple[int, int],
    stars: int | None = None,
    filters: tuple[str, ...] = ("V", "R"),
) -> dict[str, Any]:
    """Parameters of a benchmark night: frames of ``size`` (a side, or (ny, nx)); ``stars``
    None is synth's default of 80 per frame."""
    from imgproc import __version__

    if frames % len(filters):
        raise SystemExit(f"--frames must be a multiple of {len(filters)} (the filters share them)")
    return {
        "n_lights_per_filter": frames // len(filters),
        "shape": [size, size] if isinstance(size, int) else list(size),
        "filters": list(filters),
        "dtype": "uint16",
        "distractors": False,
        "seed": 0,
        "n_stars": stars or 80,
        "imgproc": __version__,
    }


def ensure_night(data: Path, name: str, params: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The night ``data/name`` (reused when ``data/name.json`` has the same parameters)."""
    from imgproc.synth import NightSpec, make_night

    root, meta_path = data / name, data / f"{name}.json"
    if meta_path.exists() and root.is_dir():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("params") == params:
            print(f"[night] reusing {root} ({len(meta['lights'])} lights)", flush=True)
            return meta_path, meta
    shutil.rmtree(root, ignore_errors=True)
    meta_path.unlink(missing_ok=True)
    spec = NightSpec(
        n_lights=params["n_lights_per_filter"],
        shape=tuple(params["shape"]),
        filters=tuple(params["filters"]),
        dtype=params["dtype"],
        distractors=params["distractors"],
        seed=params["seed"],
        n_stars=params["n_stars"],
    )
    print(
        f"[night] generating {root}: {len(spec.filters) * spec.n_lights} lights of {spec.shape}", flush=True
    )
    start = time.perf_counter()
    night = make_night(root, spec)
    lights = [
        {"name": p.name, "filter": night.truth["filter"][p.name], **night.expected_masters[p.name]}
        for p in night.lights
    ]
    meta = {
        "params": params,
        "root": str(root.resolve()),
        "lights": lights,
        "generated_s": round(time.perf_counter() - start, 1),
    }
    meta_path.write_text(json.dumps(meta, indent=1), encoding="utf-8")  # written last: marks it done
    print(f"[night] generated in {meta['generated_s']} s", flush=True)
    return meta_path, meta


def warm_up(root: Path) -> dict[str, float]:
    """Read every file of the night once so that all methods start from a warm page cache."""
    start, total = time.perf_counter(), 0
    for path in sorted(root.rglob("*.fits")):
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(8 * PAGE):
                total += len(chunk)
    return {"bytes": total, "seconds": round(time.perf_counter() - start, 2)}


# --- measuring a process tree ----------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


def _stat(pid: str) -> tuple[int, float, float] | None:
    """(ppid, cpu seconds, start time in seconds since boot) of a process."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[19]) / CLK_TCK


def _rss_kib(pid: int) -> int:
    text = _read(f"/proc/{pid}/status") or ""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _cpu_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores)."""
    values = [int(v) for v in (_read("/proc/stat") or "cpu 0 0 0 0 0").split("\n")[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLK_TCK


def wait_quiet(max_wait: float, below: float = 0.3, window: float = 2.0) -> float:
    """Wait (at most ``max_wait`` s) until the machine's busy cores over ``window`` s are below
    ``below``; returns the busy cores of the last window.  Other work shares this machine."""
    deadline = time.perf_counter() + max_wait
    while True:
        before = _cpu_busy()
        time.sleep(window)
        busy = (_cpu_busy() - before) / window
        if busy < below or time.perf_counter() >= deadline:
            return round(busy, 2)


@dataclass
class ProcRecord:
    pid: int
    cmd: str = ""
    start: float = 0.0  # epoch seconds (from /proc/<pid>/stat starttime)
    last_seen: float = 0.0
    cpu: float = 0.0  # user+sys at last sight
    peak_kib: int = 0

    def kind(self) -> str:
        if "multiprocessing.forkserver" in self.cmd:
            return "worker"  # imgproc's worker processes (and the server they fork from)
        if "-m snakemake" in self.cmd or "snakemake/__main__" in self.cmd:
            return "snakemake"
        if "imgproc.cli" in self.cmd:
            return "imgproc-cli"
        if "baselines.py" in self.cmd:
            return "baseline"
        if self.cmd.startswith(("scontrol", "sinfo", "squeue", "sacct")):
            return "slurm-query"
        return "other"


class TreeSampler(threading.Thread):
    """Every ``interval`` s: RSS of ``root`` and all its descendants (sum and per process)."""

    def __init__(self, root: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.boot = time.time() - float((_read("/proc/uptime") or "0").split()[0])
        self.peak_sum_kib = 0
        self.samples = 0
        self.records: dict[int, ProcRecord] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)
        self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def sample(self) -> None:
        now = time.time()
        info: dict[int, tuple[int, float, float]] = {}
        children: dict[int, list[int]] = defaultdict(list)
        for name in os.listdir("/proc"):
            if name.isdigit():
                stat = _stat(name)
                if stat is not None:
                    info[int(name)] = stat
                    children[stat[0]].append(int(name))
        tree, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            if pid in info:
                tree.append(pid)
                todo.extend(children.get(pid, ()))
        total = 0
        for pid in tree:
            rss = _rss_kib(pid)
            total += rss
            rec = self.records.get(pid)
            if rec is None or abs(rec.start - (self.boot + info[pid][2])) > 0.5:  # pid reused
                rec = self.records[pid] = ProcRecord(pid, start=self.boot + info[pid][2])
            cmd = (_read(f"/proc/{pid}/cmdline") or "").replace("\0", " ").strip()
            rec.cmd = cmd[:400] or rec.cmd
            rec.last_seen, rec.cpu = now, info[pid][1]
            rec.peak_kib = max(rec.peak_kib, rss)
        self.peak_sum_kib = max(self.peak_sum_kib, total)
        self.samples += 1


def measure(
    cmd: list[str], *, cwd: Path | None = None, log: Path | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``cmd`` as a child; wall, CPU and peak RSS of its process tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_before = resource.getrusage(resource.RUSAGE_SELF)
    busy_before = _cpu_busy()
    load = (_read("/proc/loadavg") or "").split()[:3]
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    status = proc.wait()
    wall = time.perf_counter() - start
    sampler.stop()
    if log:
        out.close()  # type: ignore[union-attr]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    own = (own_after.ru_utime - own_before.ru_utime) + (own_after.ru_stime - own_before.ru_stime)
    records = sorted(sampler.records.values(), key=lambda r: r.start)
    slurm = sum(max(0.0, r.last_seen - r.start) for r in records if r.kind() == "slurm-query")
    # getrusage counts only the processes reaped up the tree: not imgproc's worker processes,
    # which the server they forked from reaps, itself orphaned when Snakemake exits
    cpu = max(user + system, sum(r.cpu for r in records))
    return {
        "cmd": " ".join(cmd),
        "status": status,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "user_s": round(user, 2),
        "sys_s": round(system, 2),
        "peak_rss_sum_mib": round(sampler.peak_sum_kib / 1024, 1),
        "peak_rss_single_mib": round(max((r.peak_kib for r in records), default=0) / 1024, 1),
        "processes_seen": len(records),
        # `scontrol show config` run by snakemake-executor-plugin-slurm when Snakemake starts
        "slurm_query_s": round(slurm, 2),
        "samples": sampler.samples,
        # CPU the rest of the machine used meanwhile (other work on a shared box)
        "foreign_cpu_s": round(_cpu_busy() - busy_before - cpu - own, 1),
        "sampler_cpu_s": round(own, 2),
        "loadavg_before": load,
        "_records": records,
        "_t0": time.time() - wall,
    }


# --- imgproc: where the time goes ------------------------------------------------------------


def imgproc_breakdown(result: dict[str, Any], out: Path, cores: int) -> dict[str, Any]:
    """Where imgproc's wall time went, read from the files the run wrote (its jobs run as
    threads of the Snakemake process or in its worker processes, so the processes do not tell
    them apart): when each stage ended (s after the start), the batch jobs' own seconds (from
    their receipts), how busy the cores were with batch work, and the peak RSS of the Snakemake
    process."""
    t0 = result["_t0"]

    def ended(paths: list[Path]) -> float | None:
        times = [p.stat().st_mtime - t0 for p in paths if p.exists()]
        return round(max(times), 2) if times else None

    work = out / "work"
    stages = {
        "scan": ended([work / "manifest.tsv"]),
        "plan": ended([work / "plan.tsv"]),
        "masters": ended(list((out / "masters").glob("*.fits"))),
        "calibrate": ended(list((work / "calibrated").glob("*.json"))),
        "publish": ended(list((work / "published").glob("*.json"))),
        "summary": ended([out / "summary.json"]),
        "report": ended([out / "report.html"]),
        "exit": result["wall_s"],
    }
    batches: dict[str, dict[str, float]] = {}
    for kind in ("calibrated", "published"):
        seconds = [(read_json(p) or {}).get("seconds", 0.0) for p in (work / kind).glob("*.json")]
        batches[kind] = {"jobs": len(seconds), "seconds": round(sum(seconds), 2)}
    busy = sum(b["seconds"] for b in batches.values())
    snakemake = [r.peak_kib for r in result["_records"] if r.kind() == "snakemake"]
    return {
        "stages_end_s": {k: v for k, v in stages.items() if v is not None},
        "batches": batches,
        "batch_core_occupancy": round(busy / (cores * result["wall_s"]), 3) if result["wall_s"] else None,
        "snakemake_peak_rss_mib": round(max(snakemake, default=0) / 1024, 1),
    }


def print_breakdown(label: str, info: dict[str, Any]) -> None:
    print(f"\n  imgproc {label}: when each stage ended (s after the start)")
    print("    " + ", ".join(f"{stage} {t:.1f}" for stage, t in info["stages_end_s"].items()))
    for kind, b in info["batches"].items():
        print(f"    {kind}: {b['jobs']} batch jobs, {b['seconds']:.1f} s of batch work")
    print(f"    cores busy with batch work: {info['batch_core_occupancy']}; "
          f"Snakemake process peak RSS {info['snakemake_peak_rss_mib']:.0f} MiB")  # fmt: skip


# --- in-process profiles of one batch ---------------------------------------------------------


def _profiled(call: Any, label: str, rows: int = 18) -> str:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    try:
        call()
    finally:
        prof.disable()
    wall = time.perf_counter() - start
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    text.write(f"=== {label}: {wall:.2f} s wall under cProfile ===\n")
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)
    return text.getvalue()


def profile_batches(out: Path, mode: str, frames: int = 20) -> str:
    """cProfile imgproc's calibrate stage on ``frames`` lights of a finished run's plan (and, for a
    stack run, its publish stage on the first group), in this process, into ``out/profile``."""
    import yaml

    from imgproc.dag import Layout
    from imgproc.manifest import OK, read_tsv
    from imgproc.plan import COLUMNS
    from imgproc.publish import StackSettings, run_publish_batch
    from imgproc.stages import run_calibrate_batch

    plan = [r for r in read_tsv(out / "work" / "plan.tsv") if r["status"] == OK]
    entries = [{c: r.get(c) for c in COLUMNS} for r in plan]
    config = yaml.safe_load((out / "imgproc.yaml").read_text(encoding="utf-8"))
    tmp = out / "profile"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "work").mkdir(parents=True)
    report = _profiled(
        lambda: run_calibrate_batch(
            entries[:frames], tmp / "work", tmp / "c.json", observer=config["observer"], binning=config["bin"]
        ),
        f"{mode}: run_calibrate_batch of {min(frames, len(entries))} frames",
    )
    if mode == "stack":
        sizes: dict[str, int] = defaultdict(int)
        for e in entries:
            sizes[e["output"]] += 1
        biggest = max(sizes, key=lambda name: sizes[name])
        group = [e for e in entries if e["output"] == biggest]
        refs = {e["frame_id"]: e for e in entries if e["frame_id"] in {g["reference"] for g in group}}
        settings = StackSettings(**Layout(config).stack_params())
        report += _profiled(
            lambda: run_publish_batch(group, refs, out / "work", tmp, tmp / "p.json", settings),
            f"{mode}: run_publish_batch of one group of {len(group)} frames (align + stack)",
        )
    return report


# --- output equality -------------------------------------------------------------------------


def read_float(path: Path) -> np.ndarray:
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        return np.asarray(hdul[0].data, dtype=np.float32)


def imgproc_groups(out: Path) -> dict[frozenset[str], Path]:
    """imgproc's outputs by the set of light names they are made from (from work/plan.tsv)."""
    from imgproc.manifest import OK, read_tsv

    groups: dict[str, set[str]] = defaultdict(set)
    for row in read_tsv(out / "work" / "plan.tsv"):
        if row["status"] == OK and row.get("output"):
            groups[row["output"]].add(Path(row["path"]).name)
    return {frozenset(lights): out / name for name, lights in groups.items()}


def compare(
    ours: Path, theirs: Path, rtol: float, sample: int | None = None, min_corr: float | None = None
) -> dict[str, Any]:
    """imgproc's outputs against a baseline's, matched by their source lights: equal within
    ``rtol``, or (``min_corr``, for a baseline with other algorithms) correlated at least that
    much over the pixels both have."""
    info = json.loads((theirs / "groups.json").read_text(encoding="utf-8"))
    mine = imgproc_groups(ours)
    pairs = []
    for name, lights in sorted(info["groups"].items()):
        pairs.append((mine.get(frozenset(lights)), theirs / name))
    if sample and len(pairs) > sample:
        step = len(pairs) / sample
        pairs = [pairs[int(i * step)] for i in range(sample)]
    equal = identical = 0
    missing, worst, lowest = [], 0.0, 1.0
    for a_path, b_path in pairs:
        if a_path is None or not a_path.exists() or not b_path.exists():
            missing.append(b_path.name)
            continue
        a, b = read_float(a_path), read_float(b_path)
        if a.shape != b.shape:
            missing.append(f"{b_path.name} (shape {a.shape} vs {b.shape})")
            continue
        identical += bool(np.array_equal(a, b, equal_nan=True))
        both = np.isfinite(a) & np.isfinite(b)
        if min_corr is not None:
            corr = float(np.corrcoef(a[both], b[both])[0, 1]) if both.sum() > 1 else 0.0
            lowest = min(lowest, corr)
            equal += corr >= min_corr
            continue
        equal += bool(np.allclose(a, b, rtol=rtol, equal_nan=True))
        if both.any():
            rel = np.abs(a[both] - b[both]) / np.maximum(np.abs(b[both]), 1e-30)
            worst = max(worst, float(rel.max()))
        if (np.isnan(a) != np.isnan(b)).any():
            worst = float("inf")
    agreement = {"min_corr": min_corr, "lowest_corr": lowest} if min_corr is not None else {
        "rtol": rtol, "max_rel_diff": worst}  # fmt: skip
    return {
        "compared": len(pairs) - len(missing),
        "allclose": equal,
        "bit_identical": identical,
        "missing_or_unmatched": missing[:10],
        "n_missing": len(missing),
        **agreement,
        "ok": not missing and equal == len(pairs),
    }


# --- the benchmark ---------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    night_json: Path
    night: dict[str, Any]
    runs: Path
    logs: Path
    results: dict[str, Any] = field(default_factory=dict)

    def imgproc_cmd(
        self, root: Path, out: Path, extra: list[str], passthrough: tuple[str, ...] = ()
    ) -> list[str]:
        cmd = [
            sys.executable, "-m", "imgproc.cli", str(root / "lights"), str(out),
            "-B", str(root / "bias"), "-D", str(root / "darks"), "-F", str(root / "flats"),
            "-c", str(self.args.cores), *extra,
        ]  # fmt: skip
        return [*cmd, "--", *passthrough] if passthrough else cmd

    def run_method(
        self, method: str, mode: str, flags: list[str] | None = None, label: str | None = None
    ) -> tuple[dict[str, Any], Path]:
        """Run ``method`` with imgproc's command-line ``flags`` (default ``MODES[mode]``; a
        baseline is given the same mode, alignment, binning and threshold) into ``runs/LABEL``
        (default ``mode-method``)."""
        flags = MODES[mode] if flags is None else flags
        label = label or f"{mode}-{method}"
        out = self.runs / label
        shutil.rmtree(out, ignore_errors=True)
        root = Path(self.night["root"])
        if method == "imgproc":
            cmd = self.imgproc_cmd(root, out, flags)
        else:
            threshold = flags[flags.index("-S") + 1] if "-S" in flags else str(STACK_THRESHOLD)
            cmd = [
                sys.executable, str(BASELINES), method, str(self.night_json), str(out),
                "--mode", "stack" if "-s" in flags else "calibrate", "--cores", str(self.args.cores),
                "--threshold", threshold, "--binning", flags[flags.index("-b") + 1] if "-b" in flags else "1",
                *(["--align"] if "-a" in flags else []),
            ]  # fmt: skip
        self.quiet()
        print(f"[{label}] {method} ...", flush=True)
        env = None if method == "imgproc" else {**os.environ, **ONE_THREAD}
        result = measure(cmd, log=self.logs / f"{label}.log", env=env)
        print(
            f"[{label}] {method}: exit {result['status']}, wall {result['wall_s']} s, "
            f"cpu {result['cpu_s']} s, "
            f"peak RSS sum {result['peak_rss_sum_mib']} MiB, single {result['peak_rss_single_mib']} MiB, "
            f"foreign cpu {result['foreign_cpu_s']} s",
            flush=True,
        )
        if result["status"] != 0:
            print(f"  !! {method} failed; see {self.logs / f'{label}.log'}", flush=True)
        return result, out

    def mode(self, mode: str) -> None:
        res: dict[str, Any] = {}
        outs: dict[str, Path] = {}
        walls: dict[str, list[float]] = defaultdict(list)
        methods = [m for m in METHODS if not (m == "ccdproc" and self.args.no_ccdproc)]
        for rep in range(self.args.repeat):
            last = rep == self.args.repeat - 1
            for method in methods:
                result, outs[method] = self.run_method(method, mode)
                self.digest_run(method, mode, result, outs[method])
                walls[method].append(result["wall_s"])
                best = res.get(method)
                if best is None or (result["status"] == 0 and result["wall_s"] < best["wall_s"]):
                    res[method] = result
                if method == "imgproc" and last and mode == "calibrate":
                    self.noop_rerun(outs[method])
                if method == "imgproc" and last and self.args.profile and result["status"] == 0:
                    try:
                        text = profile_batches(outs[method], mode)
                    except Exception as exc:  # the package changes under us: report, go on
                        text = f"profiling failed: {exc!r}"
                    (self.logs / f"profile-{mode}.txt").write_text(text, encoding="utf-8")
                    res[method]["profile"] = text
                    print(text, flush=True)
        for method, result in res.items():
            result["all_walls_s"] = walls[method]
        checks: dict[str, Any] = {}
        if res["imgproc"]["status"] == 0 and res["reference"]["status"] == 0:
            print(f"[{mode}] comparing imgproc with the reference ...", flush=True)
            checks["imgproc_vs_reference"] = compare(outs["imgproc"], outs["reference"], 1e-6)
            print(f"  {checks['imgproc_vs_reference']}", flush=True)
        if "ccdproc" in res and res["ccdproc"]["status"] == 0 and res["imgproc"]["status"] == 0:
            # ccdproc normalises the flat by a plain float32 mean: equal to ~1e-5, not 1e-6. Its
            # stacks use other alignment and combining algorithms: they must only agree closely.
            loose = {"min_corr": 0.99} if mode == "stack" else {}
            checks["imgproc_vs_ccdproc"] = compare(outs["imgproc"], outs["ccdproc"], 1e-4, sample=20, **loose)
            print(f"  vs ccdproc (sample): {checks['imgproc_vs_ccdproc']}", flush=True)
        self.results.setdefault("modes", {})[mode] = {"runs": res, "checks": checks}
        if not self.args.keep_outputs:
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)

    def digest_run(self, method: str, mode: str, result: dict[str, Any], out: Path) -> None:
        """Breakdown and outcome of one run; its process records made plain data."""
        if method == "imgproc":
            result["breakdown"] = imgproc_breakdown(result, out, self.args.cores)
            if mode == "stack":  # the command, Snakemake and its worker processes, summed
                result["stack_peak_rss_mib"] = result["peak_rss_sum_mib"]
            summary = read_json(out / "summary.json")
            if summary:
                result["outcome"] = {
                    "outputs": summary.get("outputs"),
                    "failed_outputs": len(summary.get("failed_outputs", {})),
                    "lights_skipped": len(summary.get("skipped", [])),
                    "reasons": sorted({str(r) for r in summary.get("failed_outputs", {}).values()})[:3],
                }
        else:
            groups = read_json(out / "groups.json")
            if groups:
                result["outcome"] = {
                    "outputs": len(groups["groups"]),
                    "lights_excluded": len(groups["excluded"]),
                }
        if "outcome" in result:
            print(f"  outcome: {result['outcome']}", flush=True)
        result["records"] = [
            {"kind": r.kind(), "start": round(r.start - result["_t0"], 2),
             "end": round(r.last_seen - result["_t0"], 2), "cpu_s": r.cpu,
             "peak_mib": round(r.peak_kib / 1024, 1), "cmd": r.cmd[:160]}
            for r in result.pop("_records")
        ]  # fmt: skip
        result.pop("_t0")

    def quiet(self) -> None:
        """Start each run on an idle machine: the previous run's written files flushed to disk
        (writeback of gigabytes of dirty pages would slow the next run's writes), and, with
        ``--wait-quiet``, other work on the machine settled."""
        started = time.perf_counter()
        os.sync()
        print(f"  (sync: {time.perf_counter() - started:.1f} s)", flush=True)
        if self.args.wait_quiet > 0:
            busy = wait_quiet(self.args.wait_quiet)
            print(f"  (machine busy before the run: {busy} cores)", flush=True)

    def noop_rerun(self, out: Path) -> None:
        root = Path(self.night["root"])
        self.quiet()
        print("[calibrate] imgproc no-op rerun ...", flush=True)
        result = measure(self.imgproc_cmd(root, out, MODES["calibrate"]), log=self.logs / "noop-rerun.log")
        result.pop("_records"), result.pop("_t0")
        print(f"  no-op rerun: exit {result['status']}, wall {result['wall_s']} s", flush=True)
        self.results["noop_rerun"] = result
        self.results["checks"] = self.check_costs(root, out)

    def check_costs(self, root: Path, out: Path) -> dict[str, Any]:
        """What the guards and the verification of earlier work cost on this night (issue 18):
        the scan of every header with the file guards (no cache), the checks before each run
        (sizes and inode change times), and a rerun with ``--verify`` (every DATASUM read)."""
        from imgproc.scan import ScanRequest, scan
        from imgproc.verify import invalidate

        masters = {"bias": root / "bias", "dark": root / "darks", "flat": root / "flats"}
        request = ScanRequest(root / "lights", masters)
        started = time.perf_counter()
        rows = scan(request)
        costs: dict[str, Any] = {"scan_files": len(rows), "scan_s": round(time.perf_counter() - started, 3)}
        started = time.perf_counter()
        redone = invalidate(out)
        costs["pre_run_checks_s"] = round(time.perf_counter() - started, 3)
        costs["pre_run_redone"] = len(redone)
        self.quiet()
        print("[calibrate] imgproc rerun with --verify ...", flush=True)
        result = measure(self.imgproc_cmd(root, out, [*MODES["calibrate"], "--verify"]),
                         log=self.logs / "verify-rerun.log")  # fmt: skip
        costs["verify_rerun_s"], costs["verify_rerun_status"] = result["wall_s"], result["status"]
        print(f"  {costs}", flush=True)
        return costs

    def big_stack(self) -> None:
        """imgproc with ``-s -S 1 -a``: one aligned stack of every light of each filter (150
        frames each on the default night, combined at the same time), for the peak memory of
        stacking against the budget."""
        from imgproc.manifest import OK, read_tsv

        root = Path(self.night["root"])
        out = self.runs / "big-stack-imgproc"
        shutil.rmtree(out, ignore_errors=True)
        self.quiet()
        print("[big stack] imgproc -s -S 1 -a ...", flush=True)
        result = measure(self.imgproc_cmd(root, out, BIG_STACK), log=self.logs / "big-stack-imgproc.log")
        result["peak_rss_mib"] = result["peak_rss_sum_mib"]  # every imgproc process, summed
        result.pop("_records"), result.pop("_t0")
        plan = read_tsv(out / "work" / "plan.tsv") if (out / "work" / "plan.tsv").exists() else []
        sizes = Counter(str(e["output"]) for e in plan if e["status"] == OK)
        result["frames_per_stack"] = sorted(sizes.values())
        print(
            f"  exit {result['status']}, wall {result['wall_s']} s, stacks of {result['frames_per_stack']} "
            f"frames, peak RSS {result['peak_rss_mib']} MiB",
            flush=True,
        )
        self.results["big_stack"] = result
        if not self.args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)

    def big_mode(self, mode: str) -> dict[str, Any]:
        """One mode of the big-sensor case, ``--repeat`` times: the reference, then imgproc with
        each memory budget of ``--big-budgets``, the fastest run of each kept. The first round's
        outputs are compared with the reference's (aligned outputs by correlation: the reference
        registers on the first light by cross-correlation, imgproc by its config)."""
        flags = BIG_MODES[mode]
        block: dict[str, Any] = {"flags": flags, "runs": {}, "checks": {}}
        loose = {"min_corr": 0.99} if "-a" in flags else {}
        walls: dict[str, list[float]] = defaultdict(list)

        def keep(label: str, result: dict[str, Any]) -> None:
            walls[label].append(result["wall_s"])
            best = block["runs"].get(label)
            if best is None or (result["status"] == 0 and result["wall_s"] < best["wall_s"]):
                block["runs"][label] = result

        for rep in range(self.args.repeat):
            ref, ref_out = self.run_method("reference", mode, flags, f"big-{mode}-reference")
            self.digest_run("reference", mode, ref, ref_out)
            keep("reference", ref)
            for budget in self.args.big_budgets:
                label = f"imgproc-{budget}"
                setting = ["--set", f"stacking.memory_budget_mb={budget}"]
                result, out = self.run_method("imgproc", mode, [*flags, *setting], f"big-{mode}-{label}")
                self.digest_run("imgproc", mode, result, out)
                result["budget_mib"] = budget
                keep(label, result)
                if rep == 0 and result["status"] == 0 and ref["status"] == 0:
                    block["checks"][label] = compare(out, ref_out, 1e-6, **loose)
                    print(f"  vs reference: {block['checks'][label]}", flush=True)
                if not self.args.keep_outputs:
                    shutil.rmtree(out, ignore_errors=True)
            if not self.args.keep_outputs:
                shutil.rmtree(ref_out, ignore_errors=True)
        for label, result in block["runs"].items():
            result["all_walls_s"] = walls[label]
        return block

    def long_night(self) -> dict[str, Any]:
        """This bench's night as the long night (:func:`long_night`): imgproc's dry run on a
        fresh folder, real run, dry run once planned and no-op rerun, then the reference's
        calibration of the same lights, compared with imgproc's outputs."""
        n = self.args.tiny
        root = Path(self.night["root"])
        warm_up(root)
        out = self.runs / f"tiny{n}"
        shutil.rmtree(out, ignore_errors=True)
        info: dict[str, Any] = {"frames": n}
        steps = (
            ("dry_run_fresh", ("--dry-run",)),
            ("real_run", ()),
            ("dry_run_after_run", ("--dry-run",)),
            ("noop_rerun", ()),
        )
        for label, passthrough in steps:
            self.quiet()
            print(f"[tiny{n}] {label} ...", flush=True)
            result = measure(
                self.imgproc_cmd(root, out, [], passthrough), log=self.logs / f"tiny-{label}.log"
            )
            if label == "real_run":
                info["stages"] = long_night_stages(imgproc_breakdown(result, out, self.args.cores), out)
                print(f"  {info['stages']}", flush=True)
            result.pop("_records"), result.pop("_t0")
            print(
                f"  {label}: exit {result['status']}, wall {result['wall_s']} s, cpu {result['cpu_s']} s, "
                f"peak RSS sum {result['peak_rss_sum_mib']} MiB",
                flush=True,
            )
            info[label] = result
        reference, ref_out = self.run_method("reference", "calibrate", label=f"tiny{n}-reference")
        self.digest_run("reference", "calibrate", reference, ref_out)
        info["reference"] = reference
        if reference["status"] == 0 and info["real_run"]["status"] == 0:
            info["check"] = compare(out, ref_out, 1e-6)
            print(f"  vs reference: {info['check']}", flush=True)
        if not self.args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(ref_out, ignore_errors=True)
        return info


def long_night(args: argparse.Namespace, runs: Path, logs: Path) -> dict[str, Any]:
    """The long night: ``--tiny`` lights of 16x16 (``DATA/tiny<n>/``, made once), measured by
    :meth:`Bench.long_night`."""
    night_json, night = ensure_night(args.data, f"tiny{args.tiny}", night_params(args.tiny, 16))
    return Bench(args, night_json, night, runs, logs).long_night()


def long_night_stages(breakdown: dict[str, Any], out: Path) -> dict[str, Any]:
    """The plan's and the report's seconds in a real run (from when the files before and after
    them were written: the manifest and the plan, the summary and the report) and the report's
    size and number of images (its thumbnails are a sample of the frames)."""
    ends = breakdown["stages_end_s"]
    report = out / "report.html"
    text = report.read_text(encoding="utf-8", errors="replace") if report.exists() else ""

    def between(first: str, last: str) -> float | None:
        return round(ends[last] - ends[first], 2) if first in ends and last in ends else None

    return {
        "scan_end_s": ends.get("scan"),
        "plan_s": between("scan", "plan"),
        "report_s": between("summary", "report"),
        "report_bytes": len(text.encode("utf-8")),
        "report_images": text.count("<img"),
    }


def git_state() -> dict[str, Any]:
    """Commit of the checkout and whether the measured code has uncommitted changes."""

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    changed = git("status", "--short", "--", "imgproc", "rules", "scripts", "Snakefile", "config.yaml")
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted": changed.splitlines()}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def agreement(check: dict[str, Any]) -> str:
    """How the outputs of an equality check agreed: by correlation or by relative difference."""
    if check.get("min_corr") is not None:
        return f"correlated >= {check['min_corr']} (lowest {check['lowest_corr']:.4f})"
    return f"allclose (rtol {check['rtol']}), max rel diff {check['max_rel_diff']:.2e}"


def report(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    lines = []
    if "night" in results:
        lines += [
            f"imgproc benchmark: {args.frames} frames of {args.size}x{args.size} (uint16, 2 filters, "
            f"{results['night']['n_stars']} stars), {args.cores} cores, {results['machine']}, "
            f"fastest of {args.repeat} run(s) per method",
            "",
            f"{'mode':<10}{'method':<11}{'wall s':>9}{'cpu s':>9}{'RSS sum MiB':>13}{'RSS max MiB':>13}"
            f"{'foreign cpu s':>15}  exit",
        ]
    for mode, block in results.get("modes", {}).items():
        runs = block["runs"]
        for method, r in runs.items():
            lines.append(
                f"{mode:<10}{method:<11}{r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}{r['peak_rss_sum_mib']:>13.0f}"
                f"{r['peak_rss_single_mib']:>13.0f}{r['foreign_cpu_s']:>15.1f}  {r['status']}"
            )
        for method, r in runs.items():
            walls = f"; all walls {r['all_walls_s']} s" if len(r.get("all_walls_s", [])) > 1 else ""
            lines.append(f"{'':<10}{method} outcome: {r.get('outcome')}{walls}")
        for other in ("reference", "ccdproc"):
            if other in runs:
                a, b = runs["imgproc"], runs[other]
                lines.append(
                    f"{'':<10}imgproc/{other}: wall {ratio(a['wall_s'], b['wall_s'])}x, "
                    f"cpu {ratio(a['cpu_s'], b['cpu_s'])}x, "
                    f"RSS sum {ratio(a['peak_rss_sum_mib'], b['peak_rss_sum_mib'])}x"
                )
        wait = runs.get("imgproc", {}).get("slurm_query_s", 0.0)
        if wait > 0.5:
            a = runs["imgproc"]
            adjusted = ", ".join(
                f"imgproc/{other} {ratio(a['wall_s'] - wait, runs[other]['wall_s'])}x"
                for other in ("reference", "ccdproc")
                if other in runs
            )
            lines.append(
                f"{'':<10}imgproc's wall includes {wait:.1f} s waiting for `scontrol show config` "
                f"(SLURM executor plugin at Snakemake start); without it: {adjusted}"
            )
        for name, check in block["checks"].items():
            lines.append(
                f"{'':<10}{name}: {check['allclose']}/{check['compared']} {agreement(check)}, "
                f"{check['bit_identical']} bit-identical, "
                f"{check['n_missing']} unmatched -> {'OK' if check['ok'] else 'DIFFERENT'}"
            )
        if "stack_peak_rss_mib" in runs.get("imgproc", {}):
            peak = runs["imgproc"]["stack_peak_rss_mib"]
            lines.append(f"{'':<10}imgproc peak RSS while stacking (all its processes, summed): {peak} MiB")
    if "big_stack" in results:
        r = results["big_stack"]
        lines.append(
            f"\nimgproc {' '.join(BIG_STACK)} (stacks of {r['frames_per_stack']} frames): exit "
            f"{r['status']}, wall {r['wall_s']} s, peak RSS (all imgproc processes) {r['peak_rss_mib']} MiB"
        )
    for frames, modes in results.get("big", {}).items():
        lines += [
            "",
            f"big sensor: {frames} frames of {BIG_SHAPE[1]}x{BIG_SHAPE[0]} (uint16, 2 filters), "
            f"{args.cores} cores, {results['machine']}",
            f"{'mode':<12}{'method':<14}{'wall s':>8}{'cpu s':>8}{'RSS sum MiB':>13}{'RSS max MiB':>13}"
            f"{'foreign cpu s':>15}  exit",
        ]
        for mode, block in modes.items():
            ref = block["runs"]["reference"]
            for label, r in block["runs"].items():
                lines.append(
                    f"{mode:<12}{label:<14}{r['wall_s']:>8.1f}{r['cpu_s']:>8.1f}{r['peak_rss_sum_mib']:>13.0f}"
                    f"{r['peak_rss_single_mib']:>13.0f}{r['foreign_cpu_s']:>15.1f}  {r['status']}"
                    + (f"  {ratio(r['wall_s'], ref['wall_s'])}x wall" if label != "reference" else "")
                    + (f"  (walls {r['all_walls_s']})" if len(r.get("all_walls_s", [])) > 1 else "")
                )
            for label, check in block["checks"].items():
                lines.append(
                    f"{'':<12}{label} vs reference: {check['allclose']}/{check['compared']} agree "
                    f"({agreement(check)}), {check['bit_identical']} bit-identical -> "
                    f"{'OK' if check['ok'] else 'DIFFERENT'}"
                )
    if "noop_rerun" in results:
        r = results["noop_rerun"]
        lines.append(
            f"\nno-op rerun of imgproc (calibrate-only output): {r['wall_s']} s"
            f" ({r.get('slurm_query_s', 0.0)} s of it in scontrol)"
        )
    if "checks" in results:
        c = results["checks"]
        lines.append(
            f"guards and checks: scan of {c['scan_files']} headers {c['scan_s']} s; checks before a run "
            f"{c['pre_run_checks_s']} s; rerun with --verify (every DATASUM) {c['verify_rerun_s']} s"
        )
    if "tiny" in results:
        t = results["tiny"]
        lines.append(f"tiny night of {t['frames']} frames of 16x16:")
        if "stages" in t:
            st = t["stages"]
            lines.append(
                f"  real run: scan ended at {st['scan_end_s']} s, plan {st['plan_s']} s, "
                f"report {st['report_s']} s; report.html {st['report_bytes'] / 1024**2:.1f} MiB "
                f"with {st['report_images']} images"
            )
        for label in ("dry_run_fresh", "real_run", "dry_run_after_run", "noop_rerun", "reference"):
            if label in t:
                r = t[label]
                lines.append(
                    f"  {label:<20}{r['wall_s']:>8.1f} s, {r['cpu_s']:>7.1f} s CPU, "
                    f"{r['peak_rss_sum_mib']:>7.0f} MiB  (exit {r['status']}; "
                    f"{r.get('slurm_query_s', 0.0)} s of it in scontrol)"
                )
        if "reference" in t and "real_run" in t:
            lines.append(
                f"  real run / reference: {ratio(t['real_run']['wall_s'], t['reference']['wall_s'])}x wall, "
                f"{ratio(t['real_run']['cpu_s'], t['reference']['cpu_s'])}x CPU; outputs "
                f"{agreement(t['check']) if 'check' in t else 'not compared'}"
            )
    lines += ["", "targets:", *targets(results)]
    return lines


def targets(results: dict[str, Any]) -> list[str]:
    out = []

    def check(text: str, value: float | None, limit: float, below: bool = True) -> None:
        if value is None:
            return
        ok = value <= limit if below else value >= limit
        out.append(f"  [{'PASS' if ok else 'FAIL'}] {text}: {value}")

    for mode, block in results.get("modes", {}).items():
        runs = block["runs"]
        if "reference" in runs:
            check(
                f"{mode}: imgproc wall / reference <= 1.3",
                ratio(runs["imgproc"]["wall_s"], runs["reference"]["wall_s"]),
                1.3,
            )
        if "ccdproc" in runs:
            check(
                f"{mode}: ccdproc wall / imgproc >= 1.5",
                ratio(runs["ccdproc"]["wall_s"], runs["imgproc"]["wall_s"]),
                1.5,
                below=False,
            )
        if "stack_peak_rss_mib" in runs.get("imgproc", {}):
            check(f"{mode}: imgproc peak RSS (all its processes) <= {STACK_BUDGET_MIB + 300} MiB",
                  runs["imgproc"]["stack_peak_rss_mib"], STACK_BUDGET_MIB + 300)  # fmt: skip
    if "big_stack" in results:
        big = results["big_stack"]
        # a run that failed says nothing about the memory of stacking: its peak counts as unbounded
        peak = big["peak_rss_mib"] if big["status"] == 0 else float("inf")
        check(f"stacks of {max(big['frames_per_stack'], default=0)} frames: imgproc peak RSS "
              f"<= {STACK_BUDGET_MIB + 300} MiB", peak, STACK_BUDGET_MIB + 300)  # fmt: skip
    for frames, modes in results.get("big", {}).items():
        for mode, block in modes.items():
            ref = block["runs"]["reference"]
            for label, r in block["runs"].items():
                if label == "reference":
                    continue
                wall = ratio(r["wall_s"], ref["wall_s"]) if r["status"] == 0 else float("inf")
                check(
                    f"big {frames} {mode} {label}: imgproc wall / reference <= {BIG_RATIO}", wall, BIG_RATIO
                )
                peak = r["peak_rss_sum_mib"] if r["status"] == 0 else float("inf")
                limit = r["budget_mib"] + MEMORY_MARGIN_MIB
                check(f"big {frames} {mode} {label}: peak RSS sum <= {limit} MiB", peak, limit)
    if "noop_rerun" in results:
        check("no-op rerun < 5 s", results["noop_rerun"]["wall_s"], 5.0)
    tiny = results.get("tiny", {})
    for label in ("dry_run_fresh", "dry_run_after_run"):
        if label in tiny:
            check(f"dry run of {tiny['frames']} frames ({label}) < 30 s", tiny[label]["wall_s"], 30.0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, help="lights in the night, both filters (default 300)")
    parser.add_argument("--size", type=int, help="frame side in pixels (default 2048)")
    parser.add_argument("--cores", type=int, default=2, help="processes for every method (default 2)")
    parser.add_argument("--data", type=Path, default=BENCH / "data", help="where nights and runs go")
    parser.add_argument(
        "--quick", action="store_true", help="defaults of 40 frames of 512 px and a 500-frame tiny night"
    )
    parser.add_argument(
        "--tiny", type=int, default=None, help="frames of the tiny dry-run night (default 5000)"
    )
    parser.add_argument("--modes", default="calibrate,stack", help="comma list of calibrate, stack")
    parser.add_argument("--no-ccdproc", action="store_true", help="skip the ccdproc baseline")
    parser.add_argument("--no-tiny", action="store_true", help="skip the dry-run measurements")
    parser.add_argument(
        "--tiny-only", action="store_true", help="only the long night of --tiny frames, against the reference"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each run, wait up to this many s for other work on the machine to calm down",
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile one calibrate batch and one publish batch in-process"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each method per mode; the fastest is reported"
    )
    parser.add_argument("--stars", type=int, help="stars per frame (default 80, synth's default)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the output folders under DATA/runs")
    parser.add_argument(
        "--big", type=_int_list, default=[],
        help="only the big-sensor case: nights of these many frames of 9576x6388 (e.g. 10,40)",
    )  # fmt: skip
    parser.add_argument(
        "--big-modes", type=lambda text: [m.strip() for m in text.split(",")], default=list(BIG_MODES),
        help=f"modes of the big-sensor case (default {','.join(BIG_MODES)})",
    )  # fmt: skip
    parser.add_argument(
        "--big-budgets", type=_int_list, default=list(BIG_BUDGETS_MIB),
        help="stacking.memory_budget_mb values imgproc runs the big-sensor case with (default 2048,1024)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.frames = args.frames or (40 if args.quick else 300)
    args.size = args.size or (512 if args.quick else 2048)
    if args.tiny is None:
        args.tiny = 500 if args.quick else 5000
    args.data = args.data.resolve()
    runs, logs = args.data / "runs", args.data / "logs"
    runs.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    if args.big:
        return big(args, runs, logs)
    if args.tiny_only:
        results = {**run_header(args), "tiny": long_night(args, runs, logs)}
        lines = report(results, args)
        print("\n" + "\n".join(lines))
        save(results, lines, f"bench-tiny{args.tiny}-c{args.cores}")
        return 0

    night_json, night = ensure_night(
        args.data, f"night-{args.frames}x{args.size}", night_params(args.frames, args.size, args.stars)
    )
    bench = Bench(args, night_json, night, runs, logs)
    bench.results.update(run_header(args), night=night["params"])
    print("[warm-up] reading every input file once ...", flush=True)
    bench.results["warm_up"] = warm_up(Path(night["root"]))
    print(f"  {bench.results['warm_up']}", flush=True)
    modes = [mode.strip() for mode in args.modes.split(",")]
    for mode in modes:
        bench.mode(mode)
    if "stack" in modes:
        bench.big_stack()
    if not args.no_tiny:
        bench.results["tiny"] = long_night(args, runs, logs)

    lines = report(bench.results, args)
    print("\n" + "\n".join(lines))
    for mode, block in bench.results.get("modes", {}).items():
        if "breakdown" in block["runs"].get("imgproc", {}):
            print_breakdown(mode, block["runs"]["imgproc"]["breakdown"])
    save(bench.results, lines, f"bench-{args.frames}x{args.size}-c{args.cores}")
    return 0


def run_header(args: argparse.Namespace) -> dict[str, Any]:
    """When, with what arguments, on what machine and from what source a benchmark ran."""
    return {
        "started": datetime.now().isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": f"{platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}",
        "source": git_state(),
    }


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def big(args: argparse.Namespace, runs: Path, logs: Path) -> int:
    """The big-sensor case alone: for each ``--big`` frame count, a night of BIG_SHAPE frames,
    every mode of ``--big-modes`` against the reference (:meth:`Bench.big_mode`)."""
    unknown = sorted(set(args.big_modes) - set(BIG_MODES))
    if unknown:
        raise SystemExit(f"--big-modes: unknown {unknown}; known: {', '.join(BIG_MODES)}")
    results: dict[str, Any] = {**run_header(args), "big": {}}
    for frames in args.big:
        name = f"big-{frames}x{BIG_SHAPE[1]}x{BIG_SHAPE[0]}"
        night_json, night = ensure_night(args.data, name, night_params(frames, BIG_SHAPE, args.stars))
        bench = Bench(args, night_json, night, runs, logs)
        print(f"[warm-up] {name}: {warm_up(Path(night['root']))}", flush=True)
        results["big"][str(frames)] = modes = {}
        for mode in args.big_modes:
            modes[mode] = bench.big_mode(mode)
    lines = report(results, args)
    print("\n" + "\n".join(lines))
    save(results, lines, f"bench-big-{'-'.join(map(str, args.big))}-c{args.cores}")
    return 0


def save(results: dict[str, Any], lines: list[str], name: str) -> None:
    """The results and the report's lines as ``bench/results/NAME-<time>.json``."""
    results_dir = BENCH / "results"
    results_dir.mkdir(exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    target = results_dir / f"{name}-{stamp}.json"
    results["report"] = lines
    target.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    print(f"\nresults: {target}")


if __name__ == "__main__":
    sys.exit(main())
