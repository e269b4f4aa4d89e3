"""Reruns that converge, and bad input that never costs data (issue: robustness)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from astropy.io import fits
from conftest import REPO, master_flags, run_cli, run_cli_process, sha256_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgproc.cli import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE
from imgproc.keywords import normalise
from imgproc.naming import output_name, safe_part
from imgproc.scan import scan_file


def tree_digest(root: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file below ``root`` (except below ``skip``)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not (skip and skip in path.parents):
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def write_light(path: Path, template: Path, *, data: np.ndarray | None = None, **cards: object) -> None:
    """A copy of ``template`` with some cards changed (None removes the card) or new pixels."""
    with fits.open(template) as hdul:
        header = hdul[0].header.copy()
        pixels = hdul[0].data if data is None else data
    for key, value in cards.items():
        if value is None:
            header.remove(key, ignore_missing=True)
        else:
            header[key] = value
    fits.PrimaryHDU(pixels, header).writeto(path)


def test_bad_inputs_are_reported_and_every_good_frame_processed(night, tmp_path: Path) -> None:
    lights = night.root / "lights"
    good = sorted(lights.glob("*.fits"))
    template = good[0]
    (lights / "zero.fits").write_bytes(b"")
    (lights / "notfits.fit").write_text("SIMPLE = nonsense\n" * 100)
    (lights / "truncated.fits").write_bytes(good[1].read_bytes()[:-3000])  # header intact, data cut
    fits.HDUList(
        [fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("a", "E", array=[1.0])])]
    ).writeto(lights / "table.fits")
    fits.PrimaryHDU(np.zeros((3, 8, 8), np.float32)).writeto(lights / "cube.fits")
    write_light(lights / "nodate.fits", template, **{"DATE-OBS": None})
    write_light(lights / "baddate.fits", template, **{"DATE-OBS": "last tuesday"})
    write_light(lights / "noexp.fits", template, EXPTIME=None, **{"DATE-OBS": "2025-05-01T23:00:00"})
    shutil.copy(good[2], lights / "copy_of_a_light.fits")
    small = np.full((32, 32), 1000, np.uint16)
    write_light(lights / "wrongshape.fits", template, data=small, **{"DATE-OBS": "2025-05-01T23:10:00"})
    bad_pixels = fits.getdata(template).astype(np.float32)
    bad_pixels[5, 5], bad_pixels[6, 6] = np.nan, np.inf
    write_light(lights / "badpixels.fits", template, data=bad_pixels, **{"DATE-OBS": "2025-05-01T23:20:00"})
    before = tree_digest(night.root)
    out = tmp_path / "out"
    assert run_cli(lights, out, *master_flags(night)) == EXIT_INCOMPLETE

    summary = json.loads((out / "summary.json").read_text())
    reasons = {Path(item["file"]).name: item["reason"] for item in summary["skipped"]}
    expected = {
        "zero.fits": "empty",
        "notfits.fit": "not a readable FITS file",
        "truncated.fits": "truncated",
        "table.fits": "no image HDU",
        "cube.fits": "3 axes",
        "nodate.fits": "DATE-OBS is missing",
        "baddate.fits": "not an ISO date",
        "noexp.fits": "EXPTIME is missing",
        "wrongshape.fits": "NAXIS1",
    }
    for name, words in expected.items():
        assert words in reasons.pop(name), name
    assert list(reasons) == ["copy_of_a_light.fits"] or list(reasons) == [good[2].name]
    assert "duplicate of" in next(iter(reasons.values()))
    text = (out / "summary.txt").read_text()
    assert all(name in text for name in expected)
    assert len(list(out.glob("*.fits"))) == len(good) + 1  # every good light, plus the one with bad pixels
    made = [p for p in out.glob("*.fits") if fits.getheader(p)["DATE-OBS"] == "2025-05-01T23:20:00.000"]
    data = fits.getdata(made[0])
    assert np.isnan(data[5, 5]) and np.isnan(data[6, 6]) and np.isfinite(data[7, 7])
    assert tree_digest(night.root) == before  # inputs and masters untouched


def test_flat_with_zeros_gives_nan_never_inf(night, tmp_path: Path) -> None:
    flat_path = night.flat_dir / night.expected_masters[night.lights[0].name]["flat"]
    with fits.open(flat_path, mode="update") as hdul:
        hdul[0].data[10:12, 10:12] = 0.0
        hdul[0].data[20, 20] = -5.0
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    for path in out.glob("*_V_*.fits"):
        data = fits.getdata(path)
        assert not np.isinf(data).any()
        assert np.isnan(data[10:12, 10:12]).all() and np.isnan(data[20, 20])


def test_hostile_object_and_filter_stay_inside_the_output_folder(night, tmp_path: Path) -> None:
    lights = tmp_path / "hostile"
    lights.mkdir()
    hostile = ["../../escape", "a/b", 'it\'s "quoted"', "NONASCII", "X" * 300, "..", ".hidden"]
    for i, name in enumerate(hostile):
        path = lights / f"h{i}.fits"
        write_light(
            path, night.lights[0], OBJECT=name, FILTER="../V", **{"DATE-OBS": f"2025-05-02T0{i}:00:00"}
        )
        if name == "NONASCII":  # astropy will not write it; other software does
            path.write_bytes(path.read_bytes().replace(b"NONASCII", "Étoile ñ".encode("latin-1")))
    out = tmp_path / "out"
    outside_before = tree_digest(tmp_path, skip=out)
    assert run_cli(lights, out) == EXIT_OK
    names = sorted(p.name for p in out.glob("*.fits"))
    assert len(names) == len(hostile)
    for name in names:
        assert "/" not in name and not name.startswith(".") and len(name) < 200
        assert set(name) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+-")
    assert tree_digest(tmp_path, skip=out) == outside_before  # nothing written outside OUT


def test_an_existing_foreign_file_is_never_overwritten(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    victim = sorted(out.glob("*.fits"))[0]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    foreign = fresh / victim.name
    foreign.write_bytes(b"somebody else's data")
    assert run_cli(night.root / "lights", fresh, *master_flags(night)) == EXIT_INCOMPLETE
    assert foreign.read_bytes() == b"somebody else's data"
    summary = json.loads((fresh / "summary.json").read_text())
    assert "not overwritten" in summary["skipped_outputs"][victim.name] and summary["outputs_failed"] == 0
    assert len(list(fresh.glob("*.fits"))) == len(night.lights)


def test_output_folder_that_cannot_be_created_is_a_usage_error(night, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_cli_process(night.root / "lights", blocker / "out")
    assert result.returncode == EXIT_USAGE
    assert "cannot create the output folder" in result.stderr and "Traceback" not in result.stderr


def test_kill_dash_9_mid_run_then_rerun_gives_the_same_bytes(night, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert run_cli(night.root / "lights", reference, *master_flags(night), "-a", "-s", "-S", "2") == EXIT_OK
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "imgproc.py"), str(night.root / "lights"), str(out),
               *master_flags(night), "-a", "-s", "-S", "2", "-c", "1"]  # fmt: skip
    proc = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not list((out / "work" / "cal").glob("*.fits")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()  # it really was interrupted
    assert run_cli(night.root / "lights", out, *master_flags(night), "-a", "-s", "-S", "2") == EXIT_OK
    assert sha256_tree(out) == sha256_tree(reference)
    started = time.monotonic()
    result = run_cli_process(night.root / "lights", out, *master_flags(night), "-a", "-s", "-S", "2")
    assert result.returncode == EXIT_OK and "Nothing to be done" in result.stderr
    assert time.monotonic() - started < 20


def test_changed_master_redoes_only_the_frames_that_use_it(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.fits")}
    time.sleep(0.01)
    with fits.open(night.flat_dir / "flat_V.fits", mode="update") as hdul:
        hdul[0].data *= np.float32(1.1)
        hdul[0].data[0, 0] = 2.0 * hdul[0].data[0, 0]  # a real change after normalisation
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    for path in out.glob("*.fits"):
        mtime, data = before[path.name]
        if "_V_" in path.name:
            assert path.read_bytes() != data
        else:
            assert (path.stat().st_mtime_ns, path.read_bytes()) == (mtime, data)


def test_changed_light_redoes_only_its_own_frame(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.fits")}
    changed = sorted((night.root / "lights").glob("*.fits"))[1]
    time.sleep(0.01)
    with fits.open(changed, mode="update") as hdul:
        hdul[0].data[5:9, 5:9] = 60000  # a satellite trail, say: a change in the pixels only
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    redone = [p.name for p in out.glob("*.fits") if p.read_bytes() != before[p.name][1]]
    assert len(redone) == 1
    for path in out.glob("*.fits"):
        if path.name not in redone:
            assert path.stat().st_mtime_ns == before[path.name][0]
    with fits.open(out / redone[0]) as hdul:
        assert hdul[0].data[5:9, 5:9].min() > hdul[0].data[20:30, 20:30].max()


def test_added_lights_are_processed_and_the_rest_left_alone(night, tmp_path: Path) -> None:
    lights = night.root / "lights"
    held_back = sorted(lights.glob("*.fits"))[-2:]
    for path in held_back:
        path.rename(tmp_path / path.name)
    out = tmp_path / "out"
    assert run_cli(lights, out, *master_flags(night)) == EXIT_OK
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.fits")}
    cal_before = {p.name: p.stat().st_mtime_ns for p in (out / "work" / "cal").glob("*.fits")}
    for path in held_back:
        (tmp_path / path.name).rename(lights / path.name)
    assert run_cli(lights, out, *master_flags(night)) == EXIT_OK
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.fits")}
    assert len(after) == len(night.lights) and all(after[name] == mtime for name, mtime in before.items())
    cal_after = {p.name: p.stat().st_mtime_ns for p in (out / "work" / "cal").glob("*.fits")}
    assert all(cal_after[name] == mtime for name, mtime in cal_before.items())


header_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
)  # fmt: skip
KEYS = ["OBJECT", "FILTER", "FILTER1", "EXPTIME", "EXPOSURE", "DATE-OBS", "IMAGETYP", "GAIN", "OFFSET",
        "SET-TEMP", "XBINNING", "INSTRUME", "PIERSIDE", "TIME-OBS"]  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cards=st.dictionaries(st.sampled_from(KEYS), header_values, max_size=len(KEYS)))
def test_scan_and_naming_survive_random_headers(cards: dict, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("random")
    header = fits.Header()
    for key, value in cards.items():
        if value is not None and not (isinstance(value, float) and not np.isfinite(value)):
            header[key] = value
    path = folder / "frame.fits"
    fits.PrimaryHDU(np.zeros((4, 4), np.float32), header).writeto(path)
    row = scan_file(path, "light", {k: [k] for k in ("imagetyp", "object", "filter", "exptime", "date_obs")})
    assert row["path"] == str(path) and isinstance(row["error"], str)
    values = normalise(header)
    name = output_name(values["object"], "DGAH", values["filter"], datetime(2025, 1, 1))
    assert "/" not in name and not name.startswith(".") and Path(folder / name).parent == folder


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=400))
def test_safe_part_never_makes_a_path(text: str) -> None:
    part = safe_part(text)
    assert part and "/" not in part and not part.startswith(".") and len(part) <= 64
    assert part not in (".", "..")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=6000))
def test_scan_survives_random_files(blob: bytes, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("blob") / "random.fits"
    path.write_bytes(blob)
    row = scan_file(path, "light", {"date_obs": ["DATE-OBS"], "exptime": ["EXPTIME"]})
    assert row["error"]  # random bytes are never a usable light


def test_file_names_with_snakemake_syntax_are_processed(night, tmp_path: Path) -> None:
    lights = night.root / "lights"
    odd = lights / "odd<b>{c}&'.fits"
    night.lights[0].rename(odd)
    out = tmp_path / "out"
    assert run_cli(lights, out, *master_flags(night)) == EXIT_OK
    assert len(list(out.glob("*.fits"))) == len(night.lights)
    assert odd.name in (out / "work" / "plan.tsv").read_text()
