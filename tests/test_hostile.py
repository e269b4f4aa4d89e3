"""Hostile files, headers and file names cost only themselves (issue 18, file-level part)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from conftest import REPO, master_flags, run_cli, run_cli_process, sha256_tree

from imgproc.cli import EXIT_INCOMPLETE, EXIT_OK
from imgproc.fitsio import read_image
from imgproc.manifest import read_tsv, shown, write_tsv
from imgproc.scan import scan_file

KEYWORDS = {"imagetyp": ["IMAGETYP"], "exptime": ["EXPTIME"], "date_obs": ["DATE-OBS"]}


def raw_header(template: Path, replace: dict[bytes, bytes] = {}, **cards: object) -> bytes:  # noqa: B006
    """The header of ``template`` with ``cards`` set, then byte strings replaced (same length)."""
    header = fits.getheader(template)
    for key, value in cards.items():
        header[key] = value
    raw = header.tostring().encode("ascii")
    for old, new in replace.items():
        assert len(old) == len(new) and old in raw, old
        raw = raw.replace(old, new)
    return raw


def hostile_light(path: Path, template: Path, replace: dict[bytes, bytes] = {}, **cards: object) -> None:  # noqa: B006
    """A copy of ``template`` (a plain FITS light) whose header is changed byte for byte."""
    data_start = len(fits.getheader(template).tostring())
    path.write_bytes(raw_header(template, replace, **cards) + template.read_bytes()[data_start:])


def number(value: float) -> bytes:
    """A FITS number card value as astropy writes it (20 columns), to be replaced."""
    return f"{value!r:>20}".encode()


def hostile_headers(lights: Path, template: Path) -> dict[str, str]:
    """Hostile lights beside the good ones; file name -> words of the reason each is skipped."""
    nan = b"NaN".rjust(20)
    hostile_light(lights / "h_expnan.fits", template, {number(1234.5): nan}, EXPTIME=1234.5)
    hostile_light(lights / "h_datenan.fits", template, {number(1234.5): nan}, **{"DATE-OBS": 1234.5})
    hostile_light(lights / "h_bscalenan.fits", template, {number(1234.5): nan}, BSCALE=1234.5)
    hostile_light(lights / "h_tzout.fits", template, **{"DATE-OBS": "9999-12-31T23:59:59-0500"})
    hostile_light(lights / "h_9999.fits", template, **{"DATE-OBS": "9999-12-31T23:59:59"})
    hostile_light(lights / "h_exp1e300.fits", template, EXPTIME=1e300)
    noend = raw_header(template).replace(b"END" + b" " * 77, b" " * 80)
    (lights / "h_noend.fits").write_bytes(noend + bytes(20 * 2880))
    header = fits.Header({"SIMPLE": True, "BITPIX": 16, "NAXIS": 2, "NAXIS1": 30000, "NAXIS2": 30000})
    with open(lights / "h_sparse.fits", "wb") as handle:  # 1.7 GB claimed, 8 KiB on disk
        handle.write(header.tostring().encode() + bytes(5 * 1024))
        handle.truncate(2880 + 30000 * 30000 * 2)
    header.update(BITPIX=-32, NAXIS1=20000, NAXIS2=20000)
    with gzip.open(lights / "h_bomb.fits.gz", "wb", compresslevel=1) as handle:  # inflates to 1.6 GB
        handle.write(header.tostring().encode())
        for _ in range(4):
            handle.write(bytes(1 << 24))
    os.mkfifo(lights / "h_pipe.fits")
    (lights / "h_folder.fits").mkdir()
    (lights / "h_dangling.fits").symlink_to("nowhere.fits")
    return {
        "h_expnan.fits": "EXPTIME is missing",
        "h_datenan.fits": "DATE-OBS is missing",
        "h_bscalenan.fits": "BSCALE cannot be read",
        "h_tzout.fits": "out of range (years 1 to 9999) in UTC",
        "h_9999.fits": "past the year 9999",
        "h_exp1e300.fits": "past the year 9999",
        "h_noend.fits": "truncated header",
        "h_sparse.fits": "more than limits.max_frame_mb",
        "h_bomb.fits.gz": "more than limits.max_frame_mb",
        "h_pipe.fits": "FIFO",
        "h_folder.fits": "a folder",
        "h_dangling.fits": "dangling symlink",
    }


def test_hostile_files_cost_only_themselves_and_a_rerun_converges(night, tmp_path: Path) -> None:
    lights = night.root / "lights"
    template = night.lights[0]
    # control bytes in cards are blanked: these two lights are good (distinct times: no duplicates)
    hostile_light(lights / "c_nul.fits", template, {b"'V1234 Cyg'": b"'V1234 Cy\0'"},
                  **{"DATE-OBS": "2025-05-02T01:00:00"})  # fmt: skip
    hostile_light(lights / "c_tab.fits", template, {b"ab-def": b"ab\td\ne"}, NOTE="ab-def",
                  **{"DATE-OBS": "2025-05-02T02:00:00"})  # fmt: skip
    clean = tmp_path / "clean"
    assert run_cli(lights, clean, *master_flags(night)) == EXIT_OK
    objects = {fits.getheader(p)["OBJECT"] for p in clean.glob("*.fits")}
    assert objects == {"V1234 Cyg", "V1234 Cy"} and len(list(clean.glob("*.fits"))) == len(night.lights) + 2
    expected = hostile_headers(lights, template)
    out = tmp_path / "out"
    result = run_cli_process(lights, out, *master_flags(night))
    assert result.returncode == EXIT_INCOMPLETE, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    reasons = {Path(item["file"]).name: item["reason"] for item in summary["skipped"]}
    assert sorted(reasons) == sorted(expected)
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])
        assert name in (out / "summary.txt").read_text()
    assert sha256_tree(out) == sha256_tree(clean)  # every good light written, as in a clean night

    for name in expected:  # the faults removed: the run converges to the clean run's bytes
        path = lights / name
        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
    assert run_cli(lights, out, *master_flags(night)) == EXIT_OK
    assert sha256_tree(out) == sha256_tree(clean)
    assert (out / "summary.json").read_bytes() == (clean / "summary.json").read_bytes()


def test_odd_file_names_are_processed_and_named_exactly(night, tmp_path: Path) -> None:
    lights = night.root / "lights"
    odd = ["new\nline.fits", "tab\tname.fits", "cr\rname.fits", os.fsdecode(b"latin\xe9.fits")]
    originals = night.lights[: len(odd)]
    for source, name in zip(originals, odd, strict=True):
        source.rename(lights / name)
    os.mkfifo(lights / "x\npipe.fits")  # a bad file with an odd name: named exactly
    out = tmp_path / "out"
    result = run_cli_process(lights, out, *master_flags(night))
    assert result.returncode == EXIT_INCOMPLETE, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"] == len(night.lights)
    assert [item["file"] for item in summary["skipped"]] == [str(lights / "x\npipe.fits")]
    assert repr(str(lights / "x\npipe.fits")) in (out / "summary.txt").read_text()
    plan = {row["path"] for row in read_tsv(out / "work" / "plan.tsv")}
    assert {str(lights / name) for name in odd} <= plan
    (lights / "x\npipe.fits").unlink()
    assert run_cli(lights, out, *master_flags(night)) == EXIT_OK


def test_tsv_keeps_every_file_name_and_shown_escapes(tmp_path: Path) -> None:
    names = ["a\tb", "c\nd", "e\rf", 'g"h', os.fsdecode(b"i\xffj"), "plain é"]
    write_tsv(tmp_path / "t.tsv", [{"path": name} for name in names], ["path"])
    assert [row["path"] for row in read_tsv(tmp_path / "t.tsv")] == names
    assert [shown(name) for name in names[-2:]] == ["'i\\udcffj'", "plain é"]
    assert shown("c\nd") == "'c\\nd'"


MEMORY_PROBE = """
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (1200 * 1024**2, 1200 * 1024**2))
from imgproc.scan import scan_file
from imgproc.fitsio import read_image
for name in sys.argv[1:]:
    row = scan_file(Path(name), "light", {"date_obs": ["DATE-OBS"], "exptime": ["EXPTIME"]})
    print(Path(name).name, row["error"], flush=True)
"""


def test_size_claims_are_refused_within_bounded_memory(night, tmp_path: Path) -> None:
    folder = tmp_path / "hostile"
    folder.mkdir()
    expected = hostile_headers(folder, night.lights[0])
    big = ["h_sparse.fits", "h_bomb.fits.gz", "h_noend.fits"]
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, *(str(folder / name) for name in big)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in probe.stdout.splitlines())
    assert all(expected[name] in lines[name] for name in big), lines


def test_the_frame_limit_is_a_config_key(night, tmp_path: Path) -> None:
    row = scan_file(night.lights[0], "light", KEYWORDS, max_frame_bytes=64 * 64 * 4 - 1)
    assert "more than limits.max_frame_mb" in row["error"]
    assert scan_file(night.lights[0], "light", KEYWORDS, max_frame_bytes=64 * 64 * 4)["error"] == ""
    fits.CompImageHDU(np.zeros((50, 70), np.float32)).writeto(tmp_path / "c.fits.fz")
    row = scan_file(tmp_path / "c.fits.fz", "light", KEYWORDS, max_frame_bytes=1000)
    assert "HDU 1 claims a 70x50 image" in row["error"]
    assert read_image(tmp_path / "c.fits.fz")[0].shape == (50, 70)


def test_an_unreadable_file_is_skipped_and_reruns_do_not_fail(night) -> None:
    runner = shutil.which("setpriv")
    if os.geteuid() != 0 or runner is None:
        pytest.skip("needs root and setpriv to run as another user")
    # nobody must be able to start the interpreter from a process of its own (as the command
    # starts Snakemake); .ci/run makes sure of it (a venv whose python is under /root).
    child = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import astropy'], check=True)"
    probe = [runner, "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", child]
    probe_env = {**os.environ, "ASTROPY_CONFIG_DIR": tempfile.gettempdir()}  # nobody cannot read ~root
    if subprocess.run(probe, capture_output=True, env=probe_env).returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but user nobody cannot run {sys.executable}", pytrace=False)
        pytest.skip(f"user nobody cannot run {sys.executable}")
    base = Path(tempfile.mkdtemp(prefix="imgproc-nobody-"))  # pytest's folders are private to root
    try:
        base.chmod(0o755)
        shutil.copytree(night.root, base / "night")
        lights = base / "night" / "lights"
        locked = lights / "locked.fits"
        hostile_light(locked, night.lights[0], **{"DATE-OBS": "2025-05-02T01:00:00"})
        for path in [base, *base.rglob("*")]:
            os.chown(path, 65534, 65534)
        locked.chmod(0)
        out = base / "out"
        flags = ["-B", str(base / "night" / "bias"), "-D", str(base / "night" / "darks"),
                 "-F", str(base / "night" / "flats")]  # fmt: skip
        as_nobody = [runner, "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
                     str(REPO / "imgproc.py"), str(lights), str(out), *flags, "-c", "1"]  # fmt: skip
        home = base / "home"  # a home folder nobody cannot even read: the run must not need it
        home.mkdir(mode=0o700)
        env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
        for _ in range(2):  # the rerun must not fail on Snakemake's metadata of the file
            result = subprocess.run(as_nobody, capture_output=True, text=True, timeout=300, env=env)
            assert result.returncode == EXIT_INCOMPLETE, result.stderr[-3000:]
            summary = json.loads((out / "summary.json").read_text())
            skipped = [(Path(s["file"]).name, s["reason"]) for s in summary["skipped"]]
            assert skipped == [("locked.fits", "unreadable: Permission denied")]
            assert summary["outputs"] == len(night.lights)
        locked.chmod(0o644)  # made readable: the light is processed
        result = subprocess.run(as_nobody, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == EXIT_OK, result.stderr[-3000:]
        assert len(list(out.glob("*.fits"))) == len(night.lights) + 1
        assert not (out / ".snakemake" / "cache").exists()  # the run's caches went with it
    finally:
        shutil.rmtree(base)
