"""--clean, and reruns without work/: outputs recognised by their own headers."""

from __future__ import annotations

import shutil
from pathlib import Path

from astropy.io import fits
from conftest import master_flags, run_cli, run_cli_process, sha256_tree

from imgproc.cli import EXIT_INCOMPLETE, EXIT_OK
from imgproc.manifest import read_tsv
from imgproc.provenance import recognised_stamp


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.fits")}


def test_clean_deletes_the_intermediates_and_a_rerun_does_nothing(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    flags = [*master_flags(night), "-a", "-s", "-S", "2"]
    result = run_cli_process(night.root / "lights", out, *flags, "--clean")
    assert result.returncode == EXIT_OK, result.stderr
    assert f"--clean: deleted {len(night.lights)} intermediates in work/cal" in result.stderr
    assert not list((out / "work" / "cal").glob("*.fits"))
    before, times = sha256_tree(out), mtimes(out)
    again = run_cli_process(night.root / "lights", out, *flags, "--clean")
    assert again.returncode == EXIT_OK and "Nothing to be done" in again.stderr
    # another setting makes the intermediates again where it needs them, and the stacks anew
    assert run_cli(night.root / "lights", out, *flags, "--set", "stacking.method=median") == EXIT_OK
    assert all(fits.getval(p, "STACKMTH") == "median" for p in out.glob("*.fits"))
    assert run_cli(night.root / "lights", out, *flags) == EXIT_OK
    assert sha256_tree(out) == before and mtimes(out) != times


def test_a_rerun_without_work_keeps_current_outputs_and_remakes_only_the_missing(
    night, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    flags = [*master_flags(night), "-a", "-s", "-S", "2"]
    assert run_cli(night.root / "lights", out, *flags) == EXIT_OK
    before, times = sha256_tree(out), mtimes(out)
    shutil.rmtree(out / "work")
    lost = sorted(out.glob("*.fits"))[0]
    lost.unlink()
    assert run_cli(night.root / "lights", out, *flags) == EXIT_OK
    assert sha256_tree(out) == before
    assert {k: v for k, v in mtimes(out).items() if k != lost.name} == {
        k: v for k, v in times.items() if k != lost.name
    }  # the others were recognised by their headers and kept as they are


def test_a_calibrated_only_night_without_work_keeps_its_hard_linked_outputs(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    before, times = sha256_tree(out), mtimes(out)
    shutil.rmtree(out / "work")
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    assert sha256_tree(out) == before and mtimes(out) == times


def test_without_work_a_changed_or_foreign_file_is_never_overwritten(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    light_of = {row["output"]: row["path"] for row in read_tsv(out / "work" / "plan.tsv")}
    shutil.rmtree(out / "work")
    edited, foreign, good = sorted(out.glob("*.fits"))[:3]
    assert recognised_stamp(good, [light_of[good.name]]) == fits.getval(good, "IMGSTAMP")
    assert recognised_stamp(good, [light_of[edited.name]]) is None  # made from another light
    data = bytearray(edited.read_bytes())  # edited by a tool that leaves the checksums as they were
    data[-8] ^= 0x40
    edited.unlink()  # (a new file: the output was a hard link of an intermediate)
    edited.write_bytes(bytes(data))
    foreign.unlink()
    foreign.write_bytes(b"SIMPLE  =                    T" + b" " * 2849)  # not FITS imgproc wrote
    kept = {p: p.read_bytes() for p in (edited, foreign)}
    assert recognised_stamp(edited, [light_of[edited.name]]) is None
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_INCOMPLETE
    assert {p: p.read_bytes() for p in kept} == kept
    summary = (out / "summary.txt").read_text()
    assert f"{edited.name} exists and was not made by imgproc" in summary and foreign.name in summary
