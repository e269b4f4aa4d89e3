"""Frame quality (imgproc.quality) on generated frames: a clean night keeps every frame, and
injected bad frames (clouds, trailing, defocus) are each rejected by their rule, with numbers;
end to end, a defocused light is left out of its aligned stack and named in the summary."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
from astropy.io import fits
from conftest import master_flags, run_cli

from imgproc.cli import EXIT_INCOMPLETE, EXIT_OK
from imgproc.manifest import read_tsv
from imgproc.quality import FrameQuality, QualityRules, best_frame, frame_quality, quality_weights, rejections
from imgproc.stack import ArraySource, combine
from imgproc.stars import find_stars
from imgproc.synth import NightSpec, make_night, random_stars, star_field

SHAPE = (181, 233)
SKY, NOISE = 300.0, 6.0


def _frame(stars: np.ndarray, seed: int, fwhm: float = 3.0, trail: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shift = tuple(rng.uniform(-6, 6, 2))
    steps = np.linspace(-trail / 2, trail / 2, 9) if trail else [0.0]
    image = sum(star_field(SHAPE, stars, fwhm=fwhm, shift=(shift[0], shift[1] + s)) for s in steps)
    image = image / len(steps)
    return (image + SKY + rng.normal(0.0, NOISE, SHAPE)).astype(np.float32)


def _night(bad: dict[int, str]) -> list[FrameQuality]:
    """Qualities of 10 frames with seeing varying by ±5 %; ``bad`` frames are cloudy (70 % of
    the stars lost, the rest dimmed), trailed (8 px) or defocused (FWHM × 2)."""
    rng = np.random.default_rng(0)
    stars = random_stars(SHAPE, 120, rng, flux_range=(4e3, 4e5))
    out = []
    for k in range(10):
        fwhm = 3.0 * (1 + 0.05 * np.sin(k))
        kind = bad.get(k)
        if kind == "clouds":
            some = stars[rng.permutation(len(stars))[: int(0.3 * len(stars))]] * [1, 1, 0.5]
            image = _frame(some, k, fwhm)
        else:
            width = 2 * fwhm if kind == "defocus" else fwhm
            image = _frame(stars, k, width, 8.0 if kind == "trailing" else 0.0)
        out.append(frame_quality(find_stars(image)))
    return out


def test_a_clean_night_keeps_every_frame():
    qualities = _night({})
    assert rejections(qualities, QualityRules()) == {}
    fwhm = [q.fwhm for q in qualities]
    assert max(fwhm) / min(fwhm) < 1.15 and min(q.stars for q in qualities) > 60


def test_clouds_trailing_and_defocus_are_each_rejected_with_their_numbers():
    qualities = _night({2: "clouds", 5: "trailing", 7: "defocus"})
    rejected = rejections(qualities, QualityRules())
    assert sorted(rejected) == [2, 5, 7]
    assert "stars <" in rejected[2] and f"{qualities[2].stars} stars" in rejected[2]
    assert "roundness" in rejected[5] and f"{qualities[5].roundness:.2f}" in rejected[5]
    assert "FWHM" in rejected[7] and f"{qualities[7].fwhm:.2f} px" in rejected[7]
    # a rule turned off lets its frames through
    assert sorted(rejections(qualities, QualityRules(fwhm_ratio=None))) == [2, 5]


def test_the_best_frame_is_the_sharpest_the_rules_keep():
    qualities = dict(zip("abcdefghij", _night({0: "clouds", 3: "defocus"}), strict=True))
    sharpest = min("bcefghij", key=lambda k: qualities[k].fwhm)
    assert best_frame(qualities) == sharpest
    # a cloudy frame with sharp stars is not chosen, however sharp
    qualities["a"] = FrameQuality(1.0, 0.95, 20, 300.0, 6.0)
    assert best_frame(qualities) == sharpest
    # equal FWHM: the most stars, then the first name
    same = {"x": FrameQuality(3.0, 0.9, 90, 0, 1), "w": FrameQuality(3.0, 0.9, 100, 0, 1)}
    assert best_frame(same) == "w" and best_frame({"y": same["w"], "z": same["w"]}) == "y"
    assert best_frame({}) is None


def test_quality_weights_favour_sharp_quiet_frames_and_lower_the_stack_noise():
    rng = np.random.default_rng(5)
    stars = random_stars(SHAPE, 120, rng, flux_range=(4e3, 4e5))
    kinds = [(3.0, NOISE)] * 4 + [(4.8, NOISE), (3.0, 3 * NOISE)]  # (FWHM, noise): defocus, then noise
    frames = [(star_field(SHAPE, stars, fwhm=f) + SKY + rng.normal(0.0, n, SHAPE)).astype(np.float32)
              for f, n in kinds]  # fmt: skip
    qualities = [frame_quality(find_stars(frame)) for frame in frames]
    weights = quality_weights(qualities)
    assert np.mean(weights) == pytest.approx(1.0)
    good = min(weights[:4])
    assert max(weights[:4]) < 1.3 * good  # alike frames, alike weights
    assert weights[4] < 0.6 * good and weights[5] < 0.2 * good
    sources = [ArraySource(frame) for frame in frames]
    plain, weighted = combine(sources), combine(sources, weights=weights)
    sky = star_field(SHAPE, stars, fwhm=4.8) < 0.05 * NOISE
    assert np.std(weighted[sky]) < 0.8 * np.std(plain[sky])
    # a value not measured takes the others' median; a frame registered by correlation: 1
    unmeasured = [replace(q, transparency=float("nan")) for q in qualities[:3]]
    unmeasured[1] = replace(unmeasured[1], fwhm=float("nan"))
    assert quality_weights(unmeasured)[1] == pytest.approx(1.0, abs=0.2)


def test_no_rule_applies_to_short_stacks_or_sparse_fields():
    good = FrameQuality(3.0, 0.95, 100, 300.0, 6.0)
    bad = FrameQuality(7.0, 0.5, 10, 300.0, 6.0)
    assert rejections([good, bad], QualityRules()) == {}
    few = [FrameQuality(3.0, 0.95, 6, 300.0, 6.0)] * 3 + [FrameQuality(7.0, 0.95, 2, 300.0, 6.0)]
    assert rejections(few, QualityRules()) == {}


def test_a_defocused_light_is_left_out_of_its_aligned_stack_and_named(tmp_path: Path):
    night = make_night(
        tmp_path / "night",
        NightSpec(
            n_lights=5, shape=(151, 193), filters=("V",), n_stars=150, field_rotation=2.0, distractors=False
        ),
    )
    lights = sorted(night.lights)
    with fits.open(lights[3], mode="update") as hdul:  # defocus: stars blurred to ~2.3x their FWHM
        blurred = scipy.ndimage.gaussian_filter(hdul[0].data.astype(np.float32), 2.2)
        hdul[0].data = blurred.round().astype(np.uint16)
    out = tmp_path / "out"
    flags = (*master_flags(night), "-s", "-S", "1", "-a")
    assert run_cli(night.root / "lights", out, *flags, "--plan") == EXIT_OK
    assert "V1234_Cyg_V_60s_1x1: registered to its best frame (the sharpest" in (out / "plan.txt").read_text()
    assert run_cli(night.root / "lights", out, *flags) == EXIT_INCOMPLETE
    assert {row["reference"] for row in read_tsv(out / "work" / "plan.tsv")} == {"best"}
    [stack] = sorted(out.glob("*.fits"))
    header = fits.getheader(stack)
    assert header["NCOMBINE"] == 4
    history = " ".join(str(line) for line in header["HISTORY"])
    assert f"rejected {lights[3].name}:" in history and "FWHM 6." in history
    # the sharpest frame (measured at calibration) is the reference, named in the HISTORY
    receipt = next(json.loads(p.read_text()) for p in (out / "work" / "published").glob("*.json"))
    [item] = receipt["items"].values()
    chosen = min(item["quality"], key=lambda fid: (item["quality"][fid]["fwhm"], fid))
    assert item["reference"] == chosen and item["shifts"][chosen]["dx"] == 0.0
    cal = json.loads((out / "work" / "cal" / f"{chosen}.json").read_text())
    registered = history[history.index("registered to") :]  # HISTORY cards wrap at 72 characters
    assert registered.replace(" ", "").startswith(f"registeredto{Path(cal['source']).name}(bestframe)")
    assert history.count("input ") == 4 and history.count(" stars rms=") == 4 and history.count("fwhm=") == 4
    assert "STACKWGT" not in header and "weight=" not in history  # weighting: none (the default)
    summary = json.loads((out / "summary.json").read_text())
    [skipped] = summary["skipped"]
    assert Path(skipped["file"]).name == lights[3].name
    assert skipped["reason"].startswith("rejected by quality: ") and "x median 2.50 px" in skipped["reason"]
    assert lights[3].name in (out / "summary.txt").read_text()
    # the report shows every frame's quality against time, and why the frame was left out
    page = (out / "report.html").read_text()
    assert "Star FWHM, filter V" in page and "Stars detected, filter V" in page
    assert "rejected by quality: " in page and f"{item['quality'][chosen]['fwhm']:.2f}</td>" in page
    marked = re.findall(r'<tr class="[a-z]*" data-frame="([^"]+)">(?:(?!</tr>).)*<b>reference</b>', page)
    assert marked == [chosen]


@pytest.mark.parametrize("kernel", ["lanczos4", "cubic", "spline"])
def test_aligned_stack_of_a_turning_field_is_as_sharp_as_one_frame(tmp_path: Path, kernel: str):
    night = make_night(
        tmp_path / "night",
        NightSpec(
            n_lights=5, shape=(151, 193), filters=("V",), n_stars=150, field_rotation=3.0, distractors=False
        ),
    )
    out = tmp_path / "out"
    flags = ("-s", "-S", "1", "-a", "--set", f"alignment.kernel={kernel}")
    assert run_cli(night.root / "lights", out, *master_flags(night), *flags) == 0
    [stack] = sorted(out.glob("*.fits"))
    single = find_stars(fits.getdata(sorted(night.lights)[0]).astype(np.float32))
    stacked = find_stars(np.nan_to_num(fits.getdata(stack), nan=float(np.nanmedian(fits.getdata(stack)))))
    assert stacked.median_fwhm() <= 1.05 * single.median_fwhm()
    header = fits.getheader(stack)
    assert header["NCOMBINE"] == 5
    history = " ".join(str(line) for line in header["HISTORY"])
    assert "(additive normalisation)" in history and history.count(" stars rms=") == 5


def test_a_noisy_light_weighs_least_in_a_quality_weighted_stack(tmp_path: Path):
    night = make_night(
        tmp_path / "night",
        NightSpec(n_lights=4, shape=(151, 193), filters=("V",), n_stars=150, distractors=False),
    )
    lights = sorted(night.lights)
    with fits.open(lights[1], mode="update") as hdul:  # three times the noise
        noisy = hdul[0].data + np.random.default_rng(2).normal(0.0, 40.0, hdul[0].data.shape)
        hdul[0].data = noisy.clip(0, 65535).round().astype(np.uint16)
    out = tmp_path / "out"
    flags = (*master_flags(night), "-s", "-S", "1", "-a", "--set", "stacking.weighting=quality")
    assert run_cli(night.root / "lights", out, *flags) == EXIT_OK
    [stack] = sorted(out.glob("*.fits"))
    header = fits.getheader(stack)
    assert header["NCOMBINE"] == 4 and header["STACKWGT"] == "quality"
    inputs = [str(line) for line in header["HISTORY"] if str(line).startswith("input ")]
    text = "".join(str(line) for line in header["HISTORY"])
    weights = {light.name: float(re.search(rf"{light.name}.*?weight=([0-9.]+)", text)[1]) for light in lights}
    assert len(inputs) == 4 and np.mean(list(weights.values())) == pytest.approx(1.0, abs=0.002)
    assert min(weights, key=weights.get) == lights[1].name and weights[lights[1].name] < 0.5


def test_finding_stars_holds_under_three_frames_of_memory() -> None:
    """find_stars of a frame that fits one band works on a copy of it (sky subtracted, despiked)
    and a smoothed copy; the NaN mask and the despiking's padded copy go before smoothing, and
    peaks are compared one neighbour at a time: the peak it allocates stays under 3 frames (it
    was 3.7; frames read in bands take less, see test_geometry)."""
    import tracemalloc

    rng = np.random.default_rng(4)
    shape = (1100, 1500)
    stars = random_stars(shape, 200, rng, flux_range=(2e3, 5e4))
    frame = (star_field(shape, stars, fwhm=3.0) + 100.0 + rng.normal(0.0, 5.0, shape)).astype(np.float32)
    find_stars(frame[:200, :300])  # the modules it imports (scipy.spatial) are not the frame's
    tracemalloc.start()
    try:
        found = find_stars(frame, max_stars=300)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(found) > 150 and peak < 3.0 * frame.nbytes
