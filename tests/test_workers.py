"""Where jobs run: the worker processes of a big night, and the picklable job object."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import master_flags, run_cli, sha256_tree
from snakemake.iocontainers import Namedlist

from imgproc import workers
from imgproc.cli import EXIT_OK
from imgproc.workers import JobArgs, WorkerPool, job_namespace, run_adapter, use_processes

#: An adapter as in scripts/: reports where it ran, or fails the way params ask.
ADAPTER = """
import json, os
from imgproc.stack import MEMORY
from imgproc.stages import job_logging

sm = snakemake
with job_logging(sm.log[0]):
    if sm.params.action == "raise":
        raise ValueError("no such frame")
    if sm.params.action == "die":
        os._exit(3)
    report = {"pid": os.getpid(), "share": MEMORY.share, "cwd": os.getcwd(), "threads": sm.threads}
    if sm.params.action == "churn":  # a group of eight 16 MB frames held, then freed
        import numpy as np
        rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        frames = [np.ones(4 << 20, np.float32) for _ in range(8)]
        report["held"] = rss()
        del frames
        report["after"] = rss()
    with open(sm.output.report, "w") as out:
        json.dump(report, out)
"""


def _job(tmp_path: Path, action: str, name: str = "job") -> tuple[str, object]:
    script = tmp_path / "adapter.py"
    script.write_text(ADAPTER)
    sm = job_namespace(
        {"verbose": False},
        2,
        output=Namedlist(fromdict={"report": str(tmp_path / f"{name}.json")}),
        params=Namedlist(fromdict={"action": action}),
        log=Namedlist([str(tmp_path / f"{name}.log")]),
    )
    return str(script), sm


@pytest.fixture
def pool():
    pool = WorkerPool(2)
    yield pool
    pool.close()


def test_job_namespace_is_a_plain_picklable_copy_of_the_named_lists(tmp_path: Path) -> None:
    output = Namedlist(fromdict={"receipt": "work/calibrated/c0000.json"})
    sm = job_namespace({"observer": "DGAH"}, 3, output=output, log=Namedlist(["logs/c0000.log"]))
    again = pickle.loads(pickle.dumps(sm))
    assert again.output.receipt == "work/calibrated/c0000.json" == again.output[0]
    assert type(again.output.receipt) is str and isinstance(again.output, JobArgs)
    assert again.log[0] == "logs/c0000.log" and again.threads == 3 and again.config == {"observer": "DGAH"}


def test_adapter_runs_in_a_worker_process_with_its_share_of_the_memory(pool, tmp_path: Path) -> None:
    script, sm = _job(tmp_path, "report")
    pool.run(run_adapter, script, sm, str(tmp_path))
    report = json.loads((tmp_path / "job.json").read_text())
    assert report["pid"] != os.getpid()
    assert report["share"] == 0.5  # two workers keep one budget between them
    assert report["cwd"] == str(tmp_path) and report["threads"] == 2
    run_adapter(script, sm)  # and the same adapter on the caller's thread
    assert json.loads((tmp_path / "job.json").read_text())["pid"] == os.getpid()


def test_a_failing_job_raises_its_error_here_and_logs_it_there(pool, tmp_path: Path) -> None:
    script, sm = _job(tmp_path, "raise")
    with pytest.raises(ValueError, match="no such frame"):
        pool.run(run_adapter, script, sm, str(tmp_path))
    log = (tmp_path / "job.log").read_text()
    assert "ERROR imgproc: the job failed" in log and "ValueError: no such frame" in log


def test_a_dead_worker_fails_its_job_and_the_next_job_gets_new_workers(pool, tmp_path: Path) -> None:
    script, sm = _job(tmp_path, "die")
    with pytest.raises(RuntimeError, match="a worker process died while running this job"):
        pool.run(run_adapter, script, sm, str(tmp_path))
    script, sm = _job(tmp_path, "report", name="after")
    pool.run(run_adapter, script, sm, str(tmp_path))
    assert json.loads((tmp_path / "after.json").read_text())["share"] == 0.5


def test_started_pool_has_its_workers_ready(pool, tmp_path: Path) -> None:
    pool.start().join(timeout=120)
    script, sm = _job(tmp_path, "report")
    pool.run(run_adapter, script, sm, str(tmp_path))
    assert (tmp_path / "job.json").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc")
def test_a_worker_keeps_the_freed_frames_of_a_group_for_its_next_job(pool, tmp_path: Path) -> None:
    """Handing 128 MB back to the kernel after every stack made each next one fault it in again."""
    script, sm = _job(tmp_path, "churn")
    pool.run(run_adapter, script, sm, str(tmp_path))
    report = json.loads((tmp_path / "job.json").read_text())
    assert report["held"] - report["after"] < 16 << 20


def test_processes_with_two_cores_and_auto_only_for_many_or_big_lights(tmp_path: Path, monkeypatch) -> None:
    lights = tmp_path / "lights"
    (lights / "night2").mkdir(parents=True)
    for i in range(3):
        (lights / "night2" / f"l{i}.fits").write_bytes(b"\0" * 2880)
    (lights / "l3.fits").symlink_to(lights / "missing.fits")  # dangling: counted, no bytes
    assert use_processes("processes", 2, lights) and not use_processes("processes", 1, lights)
    assert not use_processes("threads", 8, lights)
    assert not use_processes("auto", 2, lights)
    monkeypatch.setattr(workers, "AUTO_MIN_BYTES", 3 * 2880)
    assert use_processes("auto", 2, lights) and not use_processes("auto", 1, lights)
    monkeypatch.setattr(workers, "AUTO_MIN_BYTES", 4 * 2880)
    assert not use_processes("auto", 2, lights)
    monkeypatch.setattr(workers, "AUTO_MIN_LIGHTS", 4)  # the lights of the whole tree
    assert use_processes("auto", 2, lights) and not use_processes("auto", 1, lights)
    with pytest.raises(ValueError, match="workers must be one of"):
        use_processes("cluster", 2, lights)


def test_a_night_in_worker_processes_is_the_same_bytes_as_in_threads(night, tmp_path: Path) -> None:
    flags = ("-a", "-s", "-S", "2", "-c", "2", "-v")
    logs = {}
    for mode in ("processes", "threads"):
        out = tmp_path / mode
        config = ("--", "--config", f"workers={mode}")
        assert run_cli(night.root / "lights", out, *master_flags(night), *flags, *config) == EXIT_OK
        logs[mode] = "".join(p.read_text() for p in (out / ".snakemake" / "log").glob("*.log"))
        calibrate_logs = "".join(p.read_text() for p in (out / "logs" / "calibrate").glob("*.log"))
        assert calibrate_logs.count("sky=") == len(night.lights)  # -v lines reach each job's log
    assert sha256_tree(tmp_path / "processes") == sha256_tree(tmp_path / "threads")
    assert len(sha256_tree(tmp_path / "processes")) == 4  # 2 filters x 2 stacks
    assert "frame jobs run in 2 worker processes" in logs["processes"]
    assert "worker processes" not in logs["threads"]


#: A Snakemake process in miniature: starts workers, then is killed (as ``imgproc`` kills it on
#: Ctrl-C) without closing them.
KILLED_PARENT = """
import os, signal
from imgproc.workers import WorkerPool

if __name__ == "__main__":
    pool = WorkerPool(2)
    print(pool.run(os.getpid), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # a zombie has ended


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_workers_end_when_the_snakemake_process_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(KILLED_PARENT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    worker = int(result.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(worker)


#: A Snakemake process in miniature that fails outside any hook, with a rate-limiter Timer pending.
CRASH_WITH_TIMER = """
import threading
from imgproc.workers import cancel_timers_at_exit

cancel_timers_at_exit()
threading.Timer(600, print).start()
raise RuntimeError("the scheduler failed")
"""


def test_a_crash_does_not_wait_for_a_pending_timer(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(CRASH_WITH_TIMER)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(workers.__file__).parent.parent)},
    )  # fmt: skip
    assert result.returncode == 1 and "the scheduler failed" in result.stderr
    assert time.monotonic() - started < 30  # not the Timer's 600 s


def test_the_snakefile_imports_no_numpy_or_astropy() -> None:
    # rules/common.smk imports these at every Snakemake start (dry runs, reruns, cluster jobs)
    code = "import sys, imgproc.dag, imgproc.workers; print(sorted({'numpy', 'astropy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
