"""End-to-end stacking (-s, -S) and alignment (-a): grouping, timing, provenance, registration."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS
from conftest import master_flags, reference_light, run_cli, sha256_tree

from imgproc import publish
from imgproc.align import Registrar, Shift
from imgproc.cache import FileCache
from imgproc.cli import EXIT_INCOMPLETE, EXIT_OK
from imgproc.dag import Layout
from imgproc.fitsio import Float32Rows, write_atomic
from imgproc.manifest import read_tsv
from imgproc.publish import StackSettings
from imgproc.synth import NightSpec, make_night


def mid(path: Path) -> datetime:
    header = fits.getheader(path)
    return datetime.fromisoformat(header["DATE-OBS"]) + timedelta(seconds=header["EXPTIME"] / 2)


def by_filter(night, filt: str) -> list[Path]:
    return sorted((p for p in night.lights if fits.getheader(p)["FILTER"] == filt), key=mid)


def test_stacks_group_each_sequence_with_mean_mid_time(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-s", "-S", "2") == EXIT_OK
    outputs = sorted(out.glob("*.fits"))
    assert len(outputs) == 4  # 4 lights per filter > 2: k = round(4/2) = 2 -> 2 stacks per filter
    for filt in ("V", "R"):
        frames = by_filter(night, filt)
        for group in (frames[:2], frames[2:]):
            mids = [mid(p) for p in group]
            mean = mids[0] + (mids[1] - mids[0]) / 2
            jd = Time(mean, scale="utc").jd
            matches = [p for p in outputs if p.name.endswith(f"_{jd:.8f}.fits") and f"_{filt}_" in p.name]
            assert len(matches) == 1, (filt, jd, [p.name for p in outputs])
            header = fits.getheader(matches[0])
            assert header["NCOMBINE"] == 2
            assert header["DATE-AVG"] == mean.isoformat(timespec="milliseconds")
            assert header["LIVETIME"] == pytest.approx(120.0) and header["EXPTIME"] == pytest.approx(60.0)
            assert header["BIASCAL"] and header["DARKCAL"] and header["FLATCAL"]
            history = " ".join(str(card) for card in header["HISTORY"])
            assert all(p.name in history for p in group) and "flat_" + filt in history


def test_short_sequences_stay_single_frames(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-s", "-S", "4") == EXIT_OK
    assert len(list(out.glob("*.fits"))) == len(night.lights)
    assert all("NCOMBINE" not in fits.getheader(p) for p in out.glob("*.fits"))


def test_aligned_singles_record_the_shift_and_share_one_grid(night, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-a") == EXIT_OK
    summary = json.loads((out / "summary.json").read_text())
    for filt in ("V", "R"):
        frames = by_filter(night, filt)
        outputs = sorted(
            (p for p in out.glob(f"*_{filt}_*.fits")), key=lambda p: fits.getheader(p)["DATE-AVG"]
        )
        assert len(outputs) == len(frames)
        # one reference (the sharpest frame) for the whole sequence
        [ref_name] = {fits.getheader(p)["ALIGNREF"] for p in outputs}
        ref_output = outputs[[p.name for p in frames].index(ref_name)]
        reference = fits.getdata(ref_output)
        ref_wcs = WCS(fits.getheader(ref_output))
        ref_dy, ref_dx = night.shifts[ref_name]
        for light, output in zip(frames, outputs, strict=True):
            header, data = fits.getheader(output), fits.getdata(output)
            true_dy, true_dx = night.shifts[light.name]
            assert header["ALIGNDY"] == pytest.approx(ref_dy - true_dy, abs=0.1)
            assert header["ALIGNDX"] == pytest.approx(ref_dx - true_dx, abs=0.1)
            assert header["ALIGNFLP"] is False
            # borders shifted in from outside the frame are NaN, never zeros
            if header["ALIGNDX"] > 0.5:
                assert np.isnan(data[:, 0]).all()
            if header["ALIGNDY"] < -0.5:
                assert np.isnan(data[-1, :]).all()
            assert not (data == 0).any()
            # the WCS moved with the pixels: the same pixel is the same sky position
            sky = WCS(header).pixel_to_world(20.0, 30.0)
            assert sky.separation(ref_wcs.pixel_to_world(20.0, 30.0)).arcsec < 0.15
            # and the pixels line up with the reference frame
            residual = Registrar(np.nan_to_num(reference, nan=np.nanmedian(reference))).measure(
                np.nan_to_num(data, nan=np.nanmedian(data))
            )
            assert abs(residual.dy) < 0.1 and abs(residual.dx) < 0.1
    assert summary["complete"]


def test_aligned_stack_is_sharper_than_unaligned(night, tmp_path: Path) -> None:
    aligned, plain = tmp_path / "aligned", tmp_path / "plain"
    assert run_cli(night.root / "lights", aligned, *master_flags(night), "-s", "-S", "1", "-a") == EXIT_OK
    assert run_cli(night.root / "lights", plain, *master_flags(night), "-s", "-S", "1") == EXIT_OK
    for filt in ("V", "R"):
        (a,) = aligned.glob(f"*_{filt}_*.fits")
        (p,) = plain.glob(f"*_{filt}_*.fits")
        assert fits.getheader(a)["NCOMBINE"] == 4
        peak_aligned, peak_plain = np.nanmax(fits.getdata(a)), np.nanmax(fits.getdata(p))
        assert peak_aligned > 1.3 * peak_plain  # dithers of up to 2 px smear the unaligned stack
        history = " ".join(str(card) for card in fits.getheader(a)["HISTORY"])
        assert history.count("dx=") == 4
        assert fits.getheader(a)["ALIGNREF"] == reference_light(aligned, a.name).name
        assert "ALIGNREF" not in fits.getheader(p)


def test_aligned_stacks_are_the_same_bytes_on_one_core_and_on_threads(night, tmp_path: Path) -> None:
    one, four = tmp_path / "one", tmp_path / "four"
    args = (*master_flags(night), "-s", "-S", "1", "-a")
    assert run_cli(night.root / "lights", one, *args, "-c", "1") == EXIT_OK
    assert run_cli(night.root / "lights", four, *args, "-c", "4") == EXIT_OK
    # 4 cores over the 2 publish batches (one stack per filter): 2 threads each
    log = "".join(p.read_text() for p in (four / ".snakemake" / "log").glob("*.log"))
    assert "rule publish_batch:" in log and "threads: 2" in log
    assert sha256_tree(four) == sha256_tree(one) and len(sha256_tree(one)) == 2


def test_frames_kept_from_registering_to_combining_give_the_same_stack(
    night, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An aligned group small enough is combined from the frames read to register it; with a
    budget too small to keep them, they are read again from their intermediates (translation
    and bilinear: a strip at a time) or spilled to disk once resampled (stars or cubic: whole
    frames), and the stack is the same bytes either way."""
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-s", "-S", "1", "-a") == EXIT_OK
    plan = read_tsv(out / "work" / "plan.tsv")
    default = StackSettings(**Layout(yaml.safe_load((out / "imgproc.yaml").read_text())).stack_params())
    held: list[str] = []  # how each frame made to register it went on to the combine
    spill, planes = publish._spill, publish._planes
    monkeypatch.setattr(publish, "_spill", lambda data, path: held.append("spilled") or spill(data, path))
    monkeypatch.setattr(publish, "_planes", lambda data: held.append("kept") or planes(data))
    for made in sorted(out.glob("*.fits")):
        group = [row for row in plan if row["output"] == made.name]
        ref_light = str(reference_light(out, made.name))
        reference = next(row for row in plan if row["path"] == ref_light)
        for settings in (default, replace(default, registration="correlation", kernel="bilinear")):
            stacks = []
            for label, budget in (("kept", settings.memory_budget), ("read-again", 1)):
                folder = tmp_path / f"{label}-{settings.registration}"
                folder.mkdir(exist_ok=True)
                before = len(held)
                item = publish.publish_group(
                    made.name, group, reference, out / "work", folder, replace(settings, memory_budget=budget)
                )
                assert item["status"] == "written" and item["ncombine"] == 4
                stacks.append((folder / made.name).read_bytes())
                whole = settings.registration == "stars"
                expected = ["kept"] * 4 if label == "kept" else ["spilled"] * (4 if whole else 0)
                assert held[before:] == expected
            assert stacks[0] == stacks[1]
            if settings == default:
                assert stacks[0] == made.read_bytes()
    assert not list((out / "work" / "pub").glob("resampled-*"))  # the spilled frames are removed


@pytest.mark.parametrize("kernel", ["bilinear", "lanczos4"])
def test_an_unmoved_frame_is_read_strip_by_strip_without_resampling(tmp_path: Path, kernel: str) -> None:
    """An unaligned member (or the reference frame) gives the combine its intermediate's rows
    as they are, reading just the strip's rows: no margin for a kernel that moves nothing."""
    data = np.random.default_rng(5).normal(100.0, 5.0, (83, 61)).astype(np.float32)
    data[7, 3] = np.nan
    write_atomic(tmp_path / "frame.fits", data, fits.Header())
    frame, reads = Float32Rows(tmp_path / "frame.fits"), []
    read = frame.read
    frame.read = lambda start, stop: reads.append((start, stop)) or read(start, stop)  # type: ignore[method-assign]
    unmoved = publish.ShiftedSource(frame, Shift(0.0, 0.0, False, 1.0), kernel)
    for r0, r1 in ((0, 41), (41, 82), (82, 83)):
        np.testing.assert_array_equal(unmoved.read_rows(r0, r1), data[r0:r1])
    assert reads == [(0, 41), (41, 82), (82, 83)]
    turned = publish.ShiftedSource(frame, Shift(0.0, 0.0, True, 1.0), kernel)  # turned by 180°
    np.testing.assert_array_equal(turned.read_rows(0, 83), data[::-1, ::-1])


def test_stars_measured_at_calibration_are_not_found_again_and_give_the_same_stack(
    night, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calibration keeps each aligned frame's stars beside it; registration matches those (no
    second detection) and the stack is the same bytes as with stars found again."""
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-s", "-S", "1", "-a") == EXIT_OK
    plan = read_tsv(out / "work" / "plan.tsv")
    settings = StackSettings(**Layout(yaml.safe_load((out / "imgproc.yaml").read_text())).stack_params())
    found: list[tuple[int, int]] = []
    original = publish.registration_stars
    monkeypatch.setattr(
        publish, "registration_stars", lambda image, **kw: found.append(image.shape) or original(image, **kw)
    )
    monkeypatch.setattr(publish, "REGISTRARS", FileCache(1 << 30))
    made = sorted(out.glob("*.fits"))[0]
    group = [row for row in plan if row["output"] == made.name]
    reference = next(row for row in plan if row["path"] == str(reference_light(out, made.name)))
    saved = publish.publish_group(made.name, group, reference, out / "work", tmp_path / "saved", settings)
    assert saved["status"] == "written" and found == []
    for row in group:  # as calibrated by a run that did not keep them
        record_path = out / "work" / "cal" / f"{row['frame_id']}.json"
        record = json.loads(record_path.read_text())
        assert len(record["stars"]["y"]) == record["quality"]["stars"] > 10
        del record["stars"]
        record_path.write_text(json.dumps(record))
    monkeypatch.setattr(publish, "REGISTRARS", FileCache(1 << 30))
    again = publish.publish_group(made.name, group, reference, out / "work", tmp_path / "found", settings)
    assert (
        again["status"] == "written" and len(found) == 4
    )  # the frames' stars (the reference's: its registrar)
    assert (tmp_path / "found" / made.name).read_bytes() == (tmp_path / "saved" / made.name).read_bytes()


def test_registrations_wait_for_room_in_the_stacking_budget(
    night, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each registering thread holds about three frames (the frame, its measured frame, its
    resampled copy): with a budget of four frames only one registers at a time, with a large
    one both threads do; the stack is the same bytes."""
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-s", "-S", "1", "-a") == EXIT_OK
    plan = read_tsv(out / "work" / "plan.tsv")
    settings = StackSettings(**Layout(yaml.safe_load((out / "imgproc.yaml").read_text())).stack_params())
    made = sorted(out.glob("*.fits"))[0]
    group = [row for row in plan if row["output"] == made.name]
    reference = next(row for row in plan if row["path"] == str(reference_light(out, made.name)))
    frame_bytes = fits.getdata(made).size * 4
    original, running, most = publish.measure, [0], [0]

    def slow_measure(*args, **kwargs):
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.2)  # long enough for the other thread to start, if it may
        running[0] -= 1
        return original(*args, **kwargs)

    monkeypatch.setattr(publish, "measure", slow_measure)
    stacks = {}
    for frames in (4, 1000):
        most[0] = 0
        folder = tmp_path / str(frames)
        budget = replace(settings, memory_budget=frames * frame_bytes)
        item = publish.publish_group(made.name, group, reference, out / "work", folder, budget, threads=2)
        assert item["status"] == "written"
        stacks[frames] = (most[0], (folder / made.name).read_bytes())
    assert stacks[4][0] == 1 and stacks[1000][0] == 2
    assert stacks[4][1] == stacks[1000][1]


def test_meridian_flip_is_rotated_before_registration(tmp_path: Path) -> None:
    night = make_night(
        tmp_path / "night", NightSpec(n_lights=4, shape=(96, 96), filters=("V",), meridian_flip=True)
    )
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-a") == EXIT_OK
    outputs = sorted(out.glob("*.fits"), key=lambda p: fits.getheader(p)["DATE-AVG"])
    lights = sorted(night.lights, key=mid)
    ref = lights.index(reference_light(out))
    flips = [fits.getheader(p)["ALIGNFLP"] for p in outputs]
    assert flips == [(k < 2) != (ref < 2) for k in range(4)]  # the second half is rotated by 180°
    reference = fits.getdata(outputs[ref])
    registrar = Registrar(np.nan_to_num(reference, nan=np.nanmedian(reference)))
    for path in outputs:
        data = fits.getdata(path)
        residual = registrar.measure(np.nan_to_num(data, nan=np.nanmedian(data)))
        assert abs(residual.dy) < 0.15 and abs(residual.dx) < 0.15 and not residual.flipped


def test_frame_that_cannot_be_aligned_is_left_out_and_reported(night, tmp_path: Path) -> None:
    victim = by_filter(night, "V")[2]
    with fits.open(victim, mode="update") as hdul:
        rng = np.random.default_rng(5)
        hdul[0].data = rng.integers(1000, 1100, size=hdul[0].data.shape).astype(np.uint16)
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night), "-s", "-S", "1", "-a") == EXIT_INCOMPLETE
    (stack,) = out.glob("*_V_*.fits")
    header = fits.getheader(stack)
    assert header["NCOMBINE"] == 3 and victim.name not in " ".join(str(c) for c in header["HISTORY"])
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(s["file"]).name for s in summary["skipped"]] == [victim.name]
    assert "alignment failed" in summary["skipped"][0]["reason"]
