"""Earlier work is verified before it is trusted (issue 18): damaged files are made again, a
rewritten input is seen however its times were set, and a passing fault is tried again."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from conftest import REPO, master_flags, run_cli, sha256_tree

from imgproc.cli import EXIT_INCOMPLETE, EXIT_OK
from imgproc.fitsio import checksum_problem, write_atomic
from imgproc.limits import SCRATCH_PREFIX
from imgproc.verify import is_transient


def test_checksum_problem_finds_a_flipped_bit_and_a_truncation(tmp_path: Path) -> None:
    path = tmp_path / "f.fits"
    write_atomic(path, np.arange(101 * 77, dtype=np.float32).reshape(101, 77), fits.Header())
    assert checksum_problem(path) == ""
    raw = bytearray(path.read_bytes())
    raw[2880 + 999] ^= 0x10
    path.write_bytes(raw)
    assert checksum_problem(path) == "f.fits: its pixels do not match its DATASUM"
    path.write_bytes(raw[:-2880])
    assert checksum_problem(path) == "f.fits is truncated"


def test_only_faults_of_the_machine_are_transient() -> None:
    assert is_transient(OSError(28, "No space left on device"))
    assert is_transient(MemoryError())
    assert not is_transient(OSError(2, "No such file or directory"))
    assert not is_transient(ValueError("bad"))


def _run(night, out: Path, *extra: str) -> int:
    return run_cli(night.root / "lights", out, *master_flags(night), *extra)


def test_a_truncated_intermediate_and_its_hard_linked_output_are_made_again(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run(night, out) == EXIT_OK
    clean = sha256_tree(out)
    intermediate = sorted((out / "work" / "cal").glob("*.fits"))[0]
    linked = [p for p in out.glob("*.fits") if p.stat().st_ino == intermediate.stat().st_ino]
    assert len(linked) == 1  # a single frame's output is a hard link of its intermediate
    os.truncate(intermediate, intermediate.stat().st_size - 2880)
    assert _run(night, out) == EXIT_OK
    assert sha256_tree(out) == clean
    assert checksum_problem(intermediate) == ""


def test_resampled_frames_a_killed_stack_left_are_deleted_by_the_next_run(
    night, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _run(night, out, "-s", "-S", "1", "-a") == EXIT_OK
    made = sha256_tree(out)
    left = out / "work" / "pub" / f"{SCRATCH_PREFIX}k1ll3d"
    left.mkdir()
    np.zeros(3 << 18, np.float32).tofile(left / "frame.f32")  # 3 MiB
    capsys.readouterr()
    assert _run(night, out, "-s", "-S", "1", "-a") == EXIT_OK
    assert "deleted the resampled frames a stopped stack left (3 MiB)" in capsys.readouterr().err
    assert not left.exists() and (out / "work" / "pub").is_dir()
    assert sha256_tree(out) == made


def test_a_flipped_bit_in_an_output_is_found_by_verify(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run(night, out, "-s", "-S", "2") == EXIT_OK
    clean = sha256_tree(out)
    target = sorted(out.glob("*.fits"))[0]
    raw = bytearray(target.read_bytes())
    raw[-2880 * 2] ^= 0x01
    target.write_bytes(raw)
    assert _run(night, out, "-s", "-S", "2") == EXIT_OK
    assert sha256_tree(out) != clean  # sizes match: a plain rerun trusts the file
    assert _run(night, out, "-s", "-S", "2", "--verify") == EXIT_OK
    assert sha256_tree(out) == clean


def test_a_light_rewritten_with_its_old_size_and_mtime_is_calibrated_again(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run(night, out) == EXIT_OK
    before = sha256_tree(out)
    light = sorted((night.root / "lights").glob("*.fits"))[2]
    stat = light.stat()
    time.sleep(0.01)
    with fits.open(light, mode="update") as hdul:
        hdul[0].data[10:14, 20:24] = 60000  # same size, new pixels
    os.utime(light, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert light.stat().st_size == stat.st_size and light.stat().st_mtime_ns == stat.st_mtime_ns
    assert _run(night, out) == EXIT_OK
    after = sha256_tree(out)
    redone = [name for name in after if after[name] != before[name]]
    assert len(redone) == 1
    with fits.open(out / redone[0]) as hdul:
        assert hdul[0].data[10:14, 20:24].min() > hdul[0].data[30:40, 30:40].max()


_ENOSPC = """
import errno, os
import imgproc.fitsio

_enter = imgproc.fitsio.ImageWriter.__enter__


def _full(self):
    if os.environ.get("IMGPROC_TEST_FULL", "") in self.path.name:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
    return _enter(self)


imgproc.fitsio.ImageWriter.__enter__ = _full
"""


def test_a_full_disk_is_not_remembered_a_rerun_converges(night, tmp_path: Path, monkeypatch) -> None:
    clean_out = tmp_path / "clean"
    assert _run(night, clean_out) == EXIT_OK
    clean = sha256_tree(clean_out)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_ENOSPC, encoding="utf-8")
    full = sorted((night.root / "lights").glob("*.fits"))[1].name.split(".")[0]  # as in its frame id
    out = tmp_path / "out"
    with monkeypatch.context() as patch:  # the Snakemake process imports sitecustomize
        patch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(REPO)]))
        patch.setenv("IMGPROC_TEST_FULL", full)
        assert _run(night, out) == EXIT_INCOMPLETE
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [Path(s["file"]).name.split(".")[0] for s in summary["skipped"]] == [full]
    reason = summary["skipped"][0]["reason"]
    assert "No space left on device" in reason and reason.endswith("(tried again on the next run)")
    assert len(list(out.glob("*.fits"))) == len(clean) - 1
    assert _run(night, out) == EXIT_OK
    assert sha256_tree(out) == clean


def test_a_master_rewritten_with_its_old_size_and_mtime_is_used_again(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run(night, out) == EXIT_OK
    before = sha256_tree(out)
    flat = night.flat_dir / "flat_V.fits"
    stat = flat.stat()
    time.sleep(0.01)
    with fits.open(flat, mode="update") as hdul:
        hdul[0].data[:, :32] *= np.float32(0.5)  # same size, new pixels
    os.utime(flat, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _run(night, out) == EXIT_OK
    after = sha256_tree(out)
    assert {name for name in after if after[name] != before[name]} == {n for n in after if "_V_" in n}


def test_a_deleted_receipt_makes_its_batch_again(night, tmp_path: Path) -> None:
    """Deleting a batch's receipt (with its output) redoes the batch: Snakemake alone would
    pass over the missing receipt behind an up-to-date summary and report it complete."""
    out = tmp_path / "out"
    assert _run(night, out, "-s", "-S", "2") == EXIT_OK
    clean = sha256_tree(out)
    for path in [*out.glob("*.fits"), *(out / "work" / "published").glob("*.json")]:
        path.unlink()
    assert _run(night, out, "-s", "-S", "2") == EXIT_OK
    assert sha256_tree(out) == clean
