"""The workflow on a real SLURM cluster, through the Snakemake slurm executor plugin.

Needs ``sinfo`` on PATH reporting an idle node and ``snakemake-executor-plugin-slurm`` installed;
skipped otherwise (set ``IMGPROC_REQUIRE_SLURM=1`` to make that a failure, as CI does after
``.ci/slurm-up.sh``).  The profile is ``profiles/slurm-ci`` (squeue polling, partition ``debug``:
the single-node cluster of ``.ci/slurm-up.sh``); ``IMGPROC_SLURM_PROFILE`` names another one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, master_flags, sha256_tree

from imgproc.cli import EXIT_OK, live_snakemake_in
from imgproc.synth import Night, NightSpec, make_night

pytestmark = pytest.mark.slurm

PROFILE = Path(os.environ.get("IMGPROC_SLURM_PROFILE", REPO / "profiles" / "slurm-ci")).resolve()
NIGHT = NightSpec(n_lights=6, shape=(128, 128))
FLAGS = ("-v", "-a", "-s", "-S", "2", "-c", "2")
RUN_TIMEOUT = 240  # seconds for one workflow run (30-45 s on the 2-core CI cluster)
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+)")
RUN_ID = re.compile(r"SLURM run ID: (\S+)")


def _slurm_missing() -> str | None:
    """Why the SLURM tests cannot run here, or None."""
    if shutil.which("sinfo") is None:
        return "no SLURM here: sinfo is not on PATH (CI: bash .ci/slurm-up.sh)"
    try:
        states = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo failed: {exc}"
    if "idle" not in states:
        return f"no idle SLURM node (sinfo -h -o %t: {' '.join(states) or 'nothing'})"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "the Snakemake slurm executor is missing: pip install snakemake-executor-plugin-slurm"
    return None


_WHY = _slurm_missing()
_REQUIRED = os.environ.get("IMGPROC_REQUIRE_SLURM") == "1"
if _WHY and not _REQUIRED:
    pytest.skip(_WHY, allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _required_slurm() -> None:
    """With IMGPROC_REQUIRE_SLURM=1 (CI after .ci/slurm-up.sh) a missing cluster is a failure."""
    if _WHY:
        pytest.fail(f"IMGPROC_REQUIRE_SLURM=1 but {_WHY}", pytrace=False)


def imgproc_command(night: Night, out: Path, *snakemake_args: str) -> list[str]:
    command = [sys.executable, str(REPO / "imgproc.py"), str(night.root / "lights"), str(out)]
    command += [*master_flags(night), *FLAGS]
    return command + (["--", *snakemake_args] if snakemake_args else [])


def slurm_command(night: Night, out: Path) -> list[str]:
    # An absolute profile path: imgproc runs Snakemake inside the output folder.
    return imgproc_command(night, out, "--profile", str(PROFILE))


def start(command: list[str], log: Path) -> subprocess.Popen:
    """Start a run in its own session (so the whole process group can be killed), output to log."""
    with open(log, "w") as handle:
        return subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip


def cancel_run(log: Path) -> None:
    """scancel the SLURM jobs of the run that wrote ``log`` and wait until none is left."""
    run_ids = RUN_ID.findall(log.read_text()) if log.exists() else []
    for run_id in run_ids:
        subprocess.run(["scancel", "--name", run_id], capture_output=True, timeout=30)
    deadline = time.monotonic() + 60
    states = "PENDING,RUNNING,COMPLETING,CONFIGURING,SUSPENDED"
    while run_ids and time.monotonic() < deadline:
        query = ["squeue", "-h", "-o", "%i", "-t", states, "--name", ",".join(run_ids)]
        if not subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.split():
            return
        time.sleep(0.5)


def stop(proc: subprocess.Popen, sig: int) -> None:
    """Signal a run's process group (Snakemake ignores SIGTERM while polling; SIGINT works)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def run(command: list[str], log: Path) -> tuple[int, str]:
    """Run to the end (SIGINT, then SIGKILL and scancel, on timeout); exit status and output."""
    proc = start(command, log)
    try:
        status = proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(proc, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop(proc, signal.SIGKILL)
            proc.wait()
        cancel_run(log)
        pytest.fail(f"timed out after {RUN_TIMEOUT} s:\n{log.read_text()[-4000:]}")
    return status, log.read_text()


def slurm_job_ids(output: str) -> list[str]:
    return SUBMITTED.findall(output)


@pytest.fixture(scope="module")
def slurm_night(tmp_path_factory: pytest.TempPathFactory) -> Night:
    return make_night(tmp_path_factory.mktemp("slurm-night"), NIGHT)


@pytest.fixture(scope="module")
def local_digests(slurm_night: Night, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Outputs of the same night run locally (no profile): the reference bytes."""
    out = tmp_path_factory.mktemp("local") / "out"
    status, output = run(imgproc_command(slurm_night, out), out.parent / "imgproc.log")
    assert status == EXIT_OK, output[-4000:]
    assert not slurm_job_ids(output)
    digests = sha256_tree(out)
    assert len(digests) == 4  # 2 filters x 6 lights, stacked in groups of 3
    return digests


@pytest.fixture
def logs():
    """Log files of the runs of a test; their SLURM jobs are cancelled at the end, whatever happens."""
    files: list[Path] = []
    yield files
    for log in files:
        cancel_run(log)


def test_slurm_run_submits_jobs_and_matches_local_bytes(
    slurm_night: Night, local_digests: dict[str, str], tmp_path: Path, logs: list[Path]
) -> None:
    out = tmp_path / "out"
    logs.append(tmp_path / "slurm.log")
    status, output = run(slurm_command(slurm_night, out), logs[-1])
    assert status == EXIT_OK, output[-4000:]
    # Snakemake names the workflow profile (profiles/default) too when it loads both
    assert f"Using profile {PROFILE}" in output or f"Using profiles {PROFILE} and" in output
    # every calibrate and publish batch went through sbatch, each with its own SLURM job id
    job_ids = slurm_job_ids(output)
    batches = [p.stem for p in (out / "work" / "calibrated").glob("*.json")]
    batches += [p.stem for p in (out / "work" / "published").glob("*.json")]
    assert batches and len(job_ids) == len(set(job_ids)) == len(batches), output[-4000:]
    # ... and ran inside SLURM through the jobstep executor (logs kept by the CI profile)
    slurm_logs = {p.stem: p for p in (out / ".snakemake" / "slurm_logs").glob("rule_*/*/*.log")}
    assert set(slurm_logs) == set(job_ids)
    assert all("--executor slurm-jobstep" in p.read_text() for p in slurm_logs.values())
    states = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%T"],
        capture_output=True, text=True, timeout=30,
    ).stdout.split()  # fmt: skip
    assert states == ["COMPLETED"] * len(job_ids)
    assert sha256_tree(out) == local_digests


def test_plain_snakemake_with_the_profile_and_no_cores_runs_on_slurm(
    slurm_night: Night, local_digests: dict[str, str], tmp_path: Path, logs: list[Path]
) -> None:
    """README's `snakemake --profile profiles/slurm --configfile OUT/imgproc.yaml`, without
    --cores (the profile gives them); the Snakefile named, so nothing is written in the checkout."""
    out = tmp_path / "out"
    logs.append(tmp_path / "plan.log")
    status, output = run([*imgproc_command(slurm_night, out), "--plan"], logs[-1])
    assert status == EXIT_OK, output[-4000:]
    logs.append(tmp_path / "plain.log")
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
               "--profile", str(PROFILE), "--configfile", str(out / "imgproc.yaml")]  # fmt: skip
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    logs[-1].write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert slurm_job_ids(proc.stdout + proc.stderr)
    assert sha256_tree(out) == local_digests


def test_killed_slurm_run_converges_to_local_bytes(
    slurm_night: Night, local_digests: dict[str, str], tmp_path: Path, logs: list[Path]
) -> None:
    out = tmp_path / "out"
    command = slurm_command(slurm_night, out)
    logs.append(tmp_path / "killed.log")
    proc = start(command, logs[-1])
    receipts = out / "work" / "calibrated"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not any(receipts.glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    stop(proc, signal.SIGKILL)  # Snakemake and imgproc, not the SLURM jobs
    proc.wait()
    killed = logs[-1].read_text()
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself:\n{killed[-4000:]}"
    assert any(receipts.glob("*.json")) and slurm_job_ids(killed)
    assert not (out / "summary.json").exists()
    cancel_run(logs[-1])  # what the killed Snakemake left queued or running
    deadline = time.monotonic() + 60
    while live_snakemake_in(out.resolve()) and time.monotonic() < deadline:
        time.sleep(0.2)  # scancelled job steps still exiting

    logs.append(tmp_path / "rerun.log")
    status, output = run(command, logs[-1])
    assert status == EXIT_OK, output[-4000:]
    assert slurm_job_ids(output), "the rerun had nothing left to do"
    assert sha256_tree(out) == local_digests

    logs.append(tmp_path / "again.log")
    status, output = run(command, logs[-1])
    assert status == EXIT_OK, output[-4000:]
    assert "Nothing to be done" in output and not slurm_job_ids(output)
    assert sha256_tree(out) == local_digests
