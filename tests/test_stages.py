"""Tests for the job plumbing of imgproc.stages: per-job logs of jobs running as threads."""

from __future__ import annotations

import logging
import threading

import pytest

from imgproc.stages import job_logging

log = logging.getLogger("imgproc")


def test_job_logs_of_concurrent_jobs_hold_only_their_own_lines(tmp_path):
    started = threading.Barrier(2)

    def job(name: str) -> None:
        with job_logging(tmp_path / f"{name}.log"):
            started.wait()  # both jobs log at the same time
            for index in range(50):
                log.info("%s line %d", name, index)

    threads = [threading.Thread(target=job, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, other in (("a", "b"), ("b", "a")):
        lines = (tmp_path / f"{name}.log").read_text().splitlines()
        assert len(lines) == 50
        assert all(line.startswith(f"INFO imgproc: {name} line") for line in lines)
        assert not any(f"{other} line" in line for line in lines)
    assert not log.handlers  # nothing left behind


def test_job_log_records_the_failure_and_verbose_adds_debug(tmp_path):
    with pytest.raises(RuntimeError), job_logging(tmp_path / "failed.log", verbose=True):
        log.debug("details")
        raise RuntimeError("disk full")
    text = (tmp_path / "failed.log").read_text()
    assert "DEBUG imgproc: details" in text
    assert "ERROR imgproc: the job failed" in text and "RuntimeError: disk full" in text
    with job_logging(tmp_path / "quiet.log"):
        log.debug("hidden")
        log.info("shown")
    assert (tmp_path / "quiet.log").read_text() == "INFO imgproc: shown\n"
