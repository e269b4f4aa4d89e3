"""Colour (one-shot-colour, Bayer) lights: CFA detection, calibration in the mosaic with a flat
normalised per colour, channel frames, RGB cubes, colour-aware binning, registration on green,
stacking per channel; the real colour sets in every output mode."""

from __future__ import annotations

import base64
import json
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
from astropy.io import fits
from conftest import SMALL, real_set, run_cli, sha256_tree

from imgproc import calibrate as calibrate_module
from imgproc.align import Registrar, Shift
from imgproc.binning import bin_image
from imgproc.cache import FileCache
from imgproc.calibrate import LightSettings, MasterCache, calibrate_frame
from imgproc.cli import EXIT_OK
from imgproc.colour import (
    channel_shift,
    colour_image,
    debayer_bilinear,
    normalise_colour_flat,
    site_offset,
    superpixel,
)
from imgproc.keywords import normalise, stored_pattern
from imgproc.manifest import OK
from imgproc.plan import PlanSettings
from imgproc.publish import StackSettings, run_publish_batch
from imgproc.scan import ScanRequest
from imgproc.stages import run_calibrate_batch, run_plan, run_scan
from imgproc.synth import ColourSpec, colour_map, make_colour_night, make_night

PATTERNS = ("RGGB", "GRBG", "GBRG", "BGGR")
MID = datetime(2025, 9, 1, 22, 0, 15)


# --- detection -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cards", "expected"),
    [
        ({"BAYERPAT": "RGGB"}, "RGGB"),  # INDI, Seestar: the pattern holds for the rows as stored
        ({"BAYERPAT": "RGGB", "ROWORDER": "TOP-DOWN"}, "RGGB"),  # N.I.N.A.
        ({"BAYERPAT": "RGGB", "XBAYROFF": 1}, "GRBG"),
        ({"BAYERPAT": "RGGB", "YBAYROFF": 1}, "GBRG"),
        ({"BAYERPAT": "RGGB", "XBAYROFF": 1, "YBAYROFF": 1}, "BGGR"),
        ({"BAYERPAT": "RGGB", "ROWORDER": "BOTTOM-UP", "NAXIS2": 700}, "GBRG"),
        ({"BAYERPAT": "RGGB", "ROWORDER": "BOTTOM-UP", "NAXIS2": 701}, "RGGB"),  # odd rows
        ({"FILTER": "RGGB", "NAXIS2": 700}, "GBRG"),  # DSLR: read top-down, stored bottom-up
        ({"FILTER": "RGGB", "ROWORDER": "TOP-DOWN", "NAXIS2": 700}, "RGGB"),
        ({"FILTER": "V"}, None),
    ],
)
def test_the_pattern_as_stored_follows_offsets_row_order_and_the_dslr_habit(
    cards: dict, expected: str
) -> None:
    assert normalise(cards)["bayerpat"] == expected


def test_the_synthetic_camera_and_the_reader_agree_on_every_layout() -> None:
    """The generator builds its mosaic in readout order and flips it; the reader computes the
    pattern as stored from the cards: they agree for every pattern, offset and row order."""
    for pattern in PATTERNS:
        for xoff, yoff, order, ny in ((0, 0, None, 6), (1, 0, "TOP-DOWN", 6), (1, 1, "BOTTOM-UP", 7)):
            spec = ColourSpec(pattern=pattern, xoff=xoff, yoff=yoff, roworder=order, shape=(ny, 8))
            stored = "".join(colour_map(spec)[:2, :2].ravel())
            assert stored == stored_pattern(pattern, xoff, yoff, order == "BOTTOM-UP", ny)


# --- calibration and channel frames -----------------------------------------------------------


def _calibrate(
    path: Path, flat: Path, target: Path, channel: str, binning: int = 1
) -> tuple[np.ndarray, fits.Header]:
    cfa = normalise(fits.getheader(path))["bayerpat"]
    return calibrate_frame(
        path, 0, {"flat": str(flat)}, MasterCache(), target,
        LightSettings("DGAH", MID, 30.0, binning=binning, cfa=cfa, channel=channel),
        prepared=target.parent / "prepared",
    )  # fmt: skip


def _expected_cells(truth: dict, name: str, colour: str) -> np.ndarray:
    """The true sky of ``colour`` on the 2×2 cells, at that colour's own sites (the mean of the
    two greens), times the mean response of those sites (what a flat normalised per colour
    leaves)."""
    sky = truth["sky"][name]["RGB".index(colour)]
    mask = truth["colours"] == colour
    ny, nx = (n // 2 * 2 for n in sky.shape)

    def cells(a: np.ndarray) -> np.ndarray:
        return a[:ny, :nx].reshape(ny // 2, 2, nx // 2, 2).sum(axis=(1, 3))

    return cells(np.where(mask, sky, 0.0)) / cells(mask) * truth["response"][mask].mean()


LAYOUTS = [
    {},
    {"xoff": 1, "yoff": 1},
    {"roworder": "TOP-DOWN"},
    {"xoff": 1, "roworder": "TOP-DOWN"},
    {"yoff": 1, "roworder": "BOTTOM-UP"},
    {"in_filter": True},
]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(
    "layout", LAYOUTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "plain"
)
def test_each_channel_frame_is_the_true_channel_within_the_noise(
    tmp_path: Path, pattern: str, layout: dict
) -> None:
    spec = ColourSpec(pattern=pattern, n_lights=1, shape=(66, 94), **layout)
    truth = make_colour_night(tmp_path, spec)
    light = truth["lights"][0]
    for colour, name in (("R", "TR"), ("G", "TG"), ("B", "TB")):
        data, header = _calibrate(
            light, tmp_path / "flats" / "master_flat.fits", tmp_path / f"{name}.fits", colour
        )
        expected = _expected_cells(truth, light.name, colour)
        assert data.shape == (33, 47) == expected.shape
        residual = data - expected
        noise = spec.noise / (np.sqrt(2) if colour == "G" else 1)  # green: the mean of two sites
        assert abs(residual.mean()) < 0.3 * noise and residual.std() < 1.3 * noise
        assert np.abs(residual).max() < 6 * noise, colour  # a wrong site would be off by ~100
        assert (header["FILTER"], header["CFACHAN"], header["XBINNING"]) == (name, colour, 2)
        assert "BAYERPAT" not in header and "XBAYROFF" not in header
        on_disk = fits.getdata(tmp_path / f"{name}.fits")
        np.testing.assert_array_equal(on_disk, data)


def test_a_light_s_mosaic_is_read_and_calibrated_once_for_its_channels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The three channel frames of a light come from one read and calibration of its mosaic; a
    light replaced on disk, or another flat, is calibrated again."""
    truth = make_colour_night(tmp_path, ColourSpec(n_lights=1, shape=(66, 94)))
    light, flat = truth["lights"][0], tmp_path / "flats" / "master_flat.fits"
    reads: list[Path] = []
    original = calibrate_module.read_image
    monkeypatch.setattr(
        calibrate_module, "read_image", lambda path, *a: reads.append(path) or original(path, *a)
    )
    monkeypatch.setattr(calibrate_module, "MOSAICS", FileCache(1 << 20))
    frames = {c: _calibrate(light, flat, tmp_path / f"T{c}.fits", c)[0] for c in "RGB"}
    assert reads.count(light) == 1
    for colour, data in frames.items():  # each channel alone, as before
        monkeypatch.setattr(calibrate_module, "MOSAICS", FileCache(1 << 20))
        np.testing.assert_array_equal(_calibrate(light, flat, tmp_path / "again.fits", colour)[0], data)
    reads.clear()
    _calibrate(light, flat, tmp_path / "R1.fits", "R")
    assert reads.count(light) == 0
    os.utime(light, ns=(0, 1))  # the light replaced: read again
    _calibrate(light, flat, tmp_path / "R2.fits", "R")
    assert reads.count(light) == 1


def test_a_colour_flat_is_normalised_per_colour_and_keeps_the_balance() -> None:
    colours = np.array(list("RGGB")).reshape(2, 2)[np.arange(6)[:, None] % 2, np.arange(8) % 2]
    flat = np.select([colours == c for c in "RGB"], [1000.0, 4000.0, 500.0]).astype(np.float32)
    flat[0, 0] = 2000.0  # one red pixel twice as sensitive as its colour's mean
    flat[1, 1] = 0.0  # a dead blue pixel
    out = normalise_colour_flat(flat, "RGGB")
    for colour in "RGB":
        assert np.nanmean(out[colours == colour]) == pytest.approx(1.0, rel=1e-6)
    assert out[0, 0] / out[0, 2] == pytest.approx(2.0) and np.isnan(out[1, 1])


def test_binning_keeps_colours_apart(tmp_path: Path) -> None:
    truth = make_colour_night(tmp_path, ColourSpec(pattern="GBRG", n_lights=1, shape=(68, 96)))
    light, flat = truth["lights"][0], tmp_path / "flats" / "master_flat.fits"
    cells, _ = _calibrate(light, flat, tmp_path / "b1.fits", "R")
    two, header2 = _calibrate(light, flat, tmp_path / "b2.fits", "R", binning=2)
    four, header4 = _calibrate(light, flat, tmp_path / "b4.fits", "R", binning=4)
    np.testing.assert_array_equal(two, cells)  # -b 2: the 2x2 cells themselves (super-pixels)
    np.testing.assert_allclose(four, bin_image(cells, 2), rtol=1e-6)  # -b 4: 2x2 cells of red only
    assert (header2["XBINNING"], header4["XBINNING"], four.shape) == (2, 4, (17, 24))
    expected = bin_image(_expected_cells(truth, light.name, "R"), 2)
    assert np.abs(four - expected).max() < 6 * 3.0 / 2  # red only: green (500) or blue (200) would show
    cube, header = _calibrate(light, flat, tmp_path / "rgb2.fits", "RGB", binning=2)
    assert cube.shape == (3, 34, 48) and header["XBINNING"] == 2 and header["FILTER"] == "RGB"
    gains = [truth["response"][truth["colours"] == c].mean() for c in "RGB"]
    for plane, (level, gain) in enumerate(zip(ColourSpec().sky, gains, strict=True)):
        assert np.median(cube[plane]) == pytest.approx(level * gain, rel=0.02)


def test_bilinear_debayer_keeps_own_sites_and_interpolates_the_others() -> None:
    rng = np.random.default_rng(3)
    mosaic = rng.uniform(0, 100, (6, 8)).astype(np.float32)
    mosaic[2, 2] = np.nan  # a red site of RGGB without a value
    cube = debayer_bilinear(mosaic, "RGGB")
    assert cube.shape == (3, 6, 8) and cube.dtype == np.float32
    assert cube[0, 0, 0] == mosaic[0, 0] and cube[1, 0, 1] == mosaic[0, 1] and cube[2, 1, 1] == mosaic[1, 1]
    assert cube[1, 1, 1] == pytest.approx(np.mean([mosaic[0, 1], mosaic[1, 0], mosaic[1, 2], mosaic[2, 1]]))
    assert cube[0, 1, 1] == pytest.approx(np.mean([mosaic[0, 0], mosaic[0, 2], mosaic[2, 0]]))  # NaN left out
    assert cube[0, 0, 1] == pytest.approx(np.mean([mosaic[0, 0], mosaic[0, 2]]))
    assert np.isnan(cube[0, 2, 2]) and np.isfinite(cube[1:, 2, 2]).all()
    flat = np.full((6, 8), 7.0, np.float32)
    np.testing.assert_allclose(debayer_bilinear(flat, "GRBG"), 7.0)  # edges need no special case
    np.testing.assert_array_equal(superpixel(mosaic, "RGGB", "B"), mosaic[1::2, 1::2])


# --- the workflow -----------------------------------------------------------------------------

SHIFTS = ((0.0, 0.0), (3.0, -4.5), (-6.0, 2.0), (4.0, 5.0))  # of the sky, in mosaic pixels
FLIPPED = (False, False, False, True)  # the last light after a meridian flip


@pytest.fixture(scope="module")
def shifted_night(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, ColourSpec]:
    root = tmp_path_factory.mktemp("colour")
    spec = ColourSpec(
        pattern="GRBG", xoff=1, roworder="TOP-DOWN", shape=(110, 148), n_lights=4, shifts=SHIFTS,
        flipped=FLIPPED,
    )  # fmt: skip
    return root, make_colour_night(root, spec), spec


def test_an_aligned_stack_of_a_shifted_colour_night_matches_the_truth(shifted_night, tmp_path: Path) -> None:
    root, truth, spec = shifted_night
    out = tmp_path / "out"
    assert run_cli(root / "lights", out, "-F", root / "flats", "-a", "-s", "-S", "1", "-c", "1") == EXIT_OK
    names = sorted(p.name for p in out.glob("*.fits"))
    assert [n.split("_")[3] for n in names] == ["TB", "TG", "TR"] and len(names) == 3
    shifts = {}
    for receipt in (out / "work" / "published").glob("*.json"):
        for item in json.loads(receipt.read_text())["items"].values():
            shifts |= {(fid[:10], fid[-2:]): (s["dy"], s["dx"]) for fid, s in item["shifts"].items()}
    for index, (dy, dx) in enumerate(SHIFTS[:3]):  # measured on green, the same for every channel
        moves = np.array([shifts[(f"colour_{index:03d}", c)] for c in ("TR", "TG", "TB")])
        assert np.ptp(moves, axis=0).max() < 1e-3  # but for the fit's last 1e-4 of a turn: (M - I) d
        my, mx = moves[1]
        assert abs(my + dy / 2) < 0.05 and abs(mx + dx / 2) < 0.05  # in cells: half the mosaic's
    # after the flip, red (stored pixel (0,0) of each RGGB cell) and blue ((1,1)) differ from
    # green by half a cell: a site's offset from the cell centre turns around
    green, red, blue = (np.array(shifts[("colour_003", c)]) for c in ("TG", "TR", "TB"))
    np.testing.assert_allclose(red - green, [0.5, 0.5], atol=1e-3)
    np.testing.assert_allclose(blue - green, [-0.5, -0.5], atol=1e-3)
    first = truth["lights"][0].name
    for name in names:
        data, header = fits.getdata(out / name), fits.getheader(out / name)
        colour = header["CFACHAN"]
        expected = _expected_cells(truth, first, colour)
        inner = (slice(5, -5), slice(5, -5))  # where every frame overlaps
        residual = (data - expected)[inner]
        noise = spec.noise / (np.sqrt(2) if colour == "G" else 1)
        assert header["NCOMBINE"] == 4 and header["FILTER"] == f"T{colour}"
        truth_inner, data_inner = expected[inner], data[inner]
        sky = truth_inner < np.median(truth_inner) + 1.0  # away from the stars
        assert (
            abs(np.median(residual[sky])) < 0.3 * noise
            and np.percentile(np.abs(residual[sky]), 90) < 2 * noise
        )
        # the stars, resampled bilinearly: in place (a 1-px slip drops this to 0.7) and their flux kept
        assert np.corrcoef(truth_inner.ravel(), data_inner.ravel())[0, 1] > 0.99
        level = np.median(truth_inner)
        assert np.sum(data_inner - level) == pytest.approx(np.sum(truth_inner - level), rel=0.03)
    summary = (out / "summary.txt").read_text()
    assert "4 colour lights (CFA RGGB as stored) -> TR, TG and TB channel frames" in summary


def test_every_channel_frame_lands_on_the_reference_even_after_a_flip(shifted_night, tmp_path: Path) -> None:
    """Each aligned channel frame, measured against the reference light's true channel, is off
    by less than 0.05 cell (the flipped light's red and blue were 0.5 cell off without their
    site correction)."""
    root, truth, _ = shifted_night
    out = tmp_path / "out"
    _pipeline(root / "lights", out, "channels", align=True, flats=root / "flats")
    for header in _channels_on_the_reference(truth, out):
        assert header.get("ALIGNFLP") == (header["DATE-OBS"] > "2025-09-01T22:03")  # the last light


def _channels_on_the_reference(truth: dict, out: Path) -> list[fits.Header]:
    """Assert that each of the 12 aligned channel frames in ``out``, measured against the first
    light's true channel, is off by less than 0.05 cell; their headers."""
    first = truth["lights"][0].name
    rng = np.random.default_rng(1)  # the registrar needs the reference's noise to scale its clipping
    truths = {c: _expected_cells(truth, first, c) for c in "RGB"}
    registrars = {c: Registrar(t + rng.normal(0, 3.0, t.shape)) for c, t in truths.items()}
    outputs = sorted(out.glob("*.fits"))
    assert len(outputs) == 12
    headers = []
    for path in outputs:
        headers.append(fits.getheader(path))
        left = registrars[headers[-1]["CFACHAN"]].measure(fits.getdata(path))
        assert abs(left.dy) < 0.05 and abs(left.dx) < 0.05 and not left.flipped, (path.name, left)
    return headers


ROTATIONS = (0.0, 33.0, 90.0, -137.0)  # degrees the sky turns in each light


def test_channel_frames_of_a_rotated_night_land_on_the_reference(tmp_path: Path) -> None:
    """Lights turned by 33°, 90° and -137° (and shifted), registered by star matching on their
    green frames: every aligned channel frame, measured against the reference light's true
    channel, is off by less than 0.05 cell. A site's offset from the cell centre turns with the
    sky (the red frame of the 90° light was 0.5 cell off without its correction)."""
    spec = ColourSpec(
        pattern="RGGB", shape=(160, 214), n_lights=4, shifts=SHIFTS, rotations=ROTATIONS, seed=3
    )
    truth = make_colour_night(tmp_path / "night", spec)
    out = tmp_path / "out"
    _, published = _pipeline(tmp_path / "night" / "lights", out, "channels", align=True,
                             flats=tmp_path / "night" / "flats")  # fmt: skip
    assert {item["status"] for item in published.values()} == {"written"}
    assert {s["method"] for item in published.values() for s in item["shifts"].values()} == {"stars"}
    _channels_on_the_reference(truth, out)
    truths = {c: _expected_cells(truth, truth["lights"][0].name, c) for c in "RGB"}
    stacked = tmp_path / "stacked"
    _pipeline(tmp_path / "night" / "lights", stacked, "channels", align=True, stack=True,
              flats=tmp_path / "night" / "flats")  # fmt: skip
    for path in sorted(stacked.glob("*.fits")):
        colour = fits.getheader(path)["CFACHAN"]
        data, expected = fits.getdata(path), truths[colour]
        seen = np.isfinite(data)  # where at least one turned frame covers the reference
        seen[:4], seen[-4:], seen[:, :4], seen[:, -4:] = False, False, False, False
        assert np.corrcoef(expected[seen], data[seen])[0, 1] > 0.99, path.name
        sky = expected < np.median(expected) + 1.0
        assert abs(np.median((data - expected)[seen & sky])) < 0.3 * spec.noise, path.name


def test_a_channel_frame_s_wcs_is_that_of_its_sites() -> None:
    """CRPIX of a red channel frame moves by its site's offset from the cell centre, so its
    WCS gives the sky its pixels sampled; the green frame's is the cells'."""
    header = fits.Header({"CRPIX1": 100.5, "CRPIX2": 60.5, "CD1_1": 1e-4, "CD2_2": 1e-4, "FILTER": "L"})
    mosaic = np.ones((40, 60), np.float32)
    _, green_header = colour_image(mosaic, header, "RGGB", "G", 1)
    _, red_header = colour_image(mosaic, header, "RGGB", "R", 1)
    assert (green_header["CRPIX1"], green_header["CRPIX2"]) == (50.5, 30.5)
    assert (red_header["CRPIX1"], red_header["CRPIX2"]) == (50.75, 30.75)
    assert red_header["CFACELLS"] == 1 and colour_image(mosaic, header, "RGGB", "R", 4)[1]["CFACELLS"] == 2


def test_a_channel_shift_follows_its_site_through_any_turn() -> None:
    """The shift of a channel frame puts each of its pixels where its site's sky lands: for
    every pattern, colour, binning and turn (180° flip included)."""
    rng = np.random.default_rng(5)
    centre = np.array([(41 - 1) / 2, (57 - 1) / 2])
    for pattern in PATTERNS:
        for channel in "RGB":
            for cells in (1, 2, 3):
                angle, flipped = rng.uniform(-180, 180), bool(rng.integers(2))
                turn = np.radians(angle)
                linear = np.array([[np.cos(turn), np.sin(turn)], [-np.sin(turn), np.cos(turn)]])
                shift = Shift(*rng.uniform(-9, 9, 2), flipped, 1.0, linear=tuple(linear.ravel()))
                moved = channel_shift(shift, pattern, channel, cells)
                offset = np.array(site_offset(pattern, channel, cells))
                pixels = rng.uniform(0, 40, (5, 2))
                sky = (pixels + offset - centre) @ shift.total().T + centre + [shift.dy, shift.dx]
                lands = (pixels - centre) @ moved.total().T + centre + [moved.dy, moved.dx]
                np.testing.assert_allclose(lands + offset, sky, atol=1e-9)
    assert site_offset("RGGB", "R") == (-0.25, -0.25) and site_offset("RGGB", "B", 2) == (0.125, 0.125)
    assert site_offset("GRBG", "G") == (0.0, 0.0)


def test_an_rgb_cube_stack_and_its_colour_thumbnail(shifted_night, tmp_path: Path) -> None:
    root, truth, _ = shifted_night
    out = tmp_path / "out"
    _pipeline(root / "lights", out, "rgb", align=True, stack=True, flats=root / "flats")
    _, again = _pipeline(root / "lights", out, "rgb", align=True, stack=True, flats=root / "flats")
    assert [item["status"] for item in again.values()] == ["reused"]  # the cubes' DATASUM verified
    [stack] = out.glob("*_RGB_*.fits")
    cube, header = fits.getdata(stack), fits.getheader(stack)
    assert cube.shape == (3, 110, 148) and header["NCOMBINE"] == 4 and header["CFACHAN"] == "RGB"
    gains = [truth["response"][truth["colours"] == c].mean() for c in "RGB"]
    for plane, (level, gain) in enumerate(zip(ColourSpec().sky, gains, strict=True)):
        assert np.nanmedian(cube[plane]) == pytest.approx(level * gain, rel=0.02)
    thumb = json.loads((out / "work" / "thumbs" / f"{stack.name}.json").read_text())
    png = base64.b64decode(thumb["png"])
    assert png[25] == 2  # IHDR colour type 2: an RGB thumbnail


@pytest.mark.parametrize("align", [True, False])
def test_rgb_cube_stacks_stream_from_disk_within_a_small_budget(
    shifted_night, tmp_path: Path, align: bool
) -> None:
    """With a budget too small to hold the cubes, an RGB stack reads each plane of its
    intermediates (or of its resampled frames, spilled to disk) a strip at a time: the same
    bytes as combined in memory."""
    root = shifted_night[0]
    cubes = {}
    for budget in (2 * 1024**3, 200_000):
        out = tmp_path / str(budget)
        _pipeline(root / "lights", out, "rgb", align=align, stack=True, flats=root / "flats", budget=budget)
        [stack] = out.glob("*_RGB_*.fits")
        cubes[budget] = fits.getdata(stack)
    assert cubes[200_000].shape == (3, 110, 148)
    np.testing.assert_array_equal(cubes[200_000], cubes[2 * 1024**3])


def _pipeline(lights: Path, out: Path, colour: str, *, binning: int = 1, align: bool = False,
              stack: bool = False, flats: Path | None = None, reference: str = "first",
              budget: int = 2 * 1024**3) -> tuple[list[dict], dict]:  # fmt: skip
    """The stages in this process (no Snakemake), every light in one calibrate and one publish
    batch: scan, plan, calibrate, publish; returns the plan and the publish results."""
    work = out / "work"
    masters = {"flat": flats} if flats else {}
    run_scan(ScanRequest(lights, masters, exclude=[out]), work / "manifest.tsv", work / "cache.tsv")
    settings = PlanSettings(binning=binning, align=align, stack=stack, stack_threshold=1,
                            colour_output=colour, reference=reference)  # fmt: skip
    plan = run_plan(work / "manifest.tsv", work / "plan.tsv", work / "masters.tsv", settings)
    ok = [entry for entry in plan if entry["status"] == OK]
    receipt, measure = work / "calibrated" / "c.json", reference == "best"
    run_calibrate_batch(ok, work, receipt, observer="DGAH", binning=binning, quality=measure)
    refs = {entry["frame_id"]: entry for entry in ok}
    published = run_publish_batch(
        ok,
        refs,
        work,
        out,
        work / "published" / "p.json",
        StackSettings(align=align, reference=reference, memory_budget=budget),
    )
    return plan, published


def test_channel_frames_are_registered_to_the_light_whose_green_frame_is_best(
    shifted_night, tmp_path: Path
) -> None:
    """With reference best, the red, green and blue sequences all register to one light: the
    best by its green frame's quality (here not the first light, whose stars are blurred)."""
    root, truth, _ = shifted_night
    lights = tmp_path / "lights"
    lights.mkdir()
    for index, path in enumerate(truth["lights"]):
        with fits.open(path) as hdul:
            data = hdul[0].data.astype(np.float32)
            if index == 0:
                data = scipy.ndimage.gaussian_filter(data, 1.2)
            fits.writeto(lights / path.name, data.round().astype(np.uint16), hdul[0].header)
    out = tmp_path / "out"
    plan, published = _pipeline(lights, out, "channels", align=True, stack=True, flats=root / "flats",
                                reference="best")  # fmt: skip
    assert {entry["reference"] for entry in plan} == {"best"}
    green = {e["frame_id"]: e for e in plan if e["channel"] == "G"}
    records = {f: json.loads((out / "work" / "cal" / f"{f}.json").read_text())["quality"] for f in green}
    best = min(records, key=lambda fid: (records[fid]["fwhm"], -records[fid]["stars"], fid))
    assert green[best]["path"] != str(truth["lights"][0])  # the blurred light is not the best
    assert records[best]["fwhm"] < records[min(green, key=lambda f: green[f]["mid"])]["fwhm"]
    assert len(published) == 3 and {item["reference"] for item in published.values()} == {best}
    for item in published.values():
        assert [fid for fid, s in item["shifts"].items() if s["dx"] == s["dy"] == 0.0] == [
            fid for fid in item["shifts"] if fid.startswith(best.removesuffix("-TG"))
        ]
    for name in published:
        history = "".join(str(line) for line in fits.getheader(out / name)["HISTORY"]).replace(" ", "")
        assert f"registeredto{Path(green[best]['path']).name}(bestframe)" in history


def _few(name: str, tmp_path: Path, files: list[str]) -> Path:
    """A folder of links to a few frames of real set ``name`` (the data are not copied)."""
    folder = tmp_path / f"{name}-lights"
    folder.mkdir()
    for file in files:
        os.symlink(real_set(name) / "lights" / file, folder / file)
    return folder


def _outputs(out: Path) -> dict[str, tuple]:
    found = {}
    for path in sorted(out.glob("*.fits")):
        header = fits.getheader(path)
        found[path.name] = (fits.getdata(path).shape, header["FILTER"], header.get("NCOMBINE", 1))
    return found


SEESTAR = ["Light_NGC 7023_10.0s_IRCUT_20240730-224436.fit", "Light_NGC 7023_10.0s_IRCUT_20240730-224448.fit"]
INDI = ["Light_1069.fits", "Light_1114.fits"]
PANOPTES = ["solved.fits.fz", "tiny.fits", "pole.fits"]


@pytest.mark.parametrize("mode", ["channels", "green", "rgb", "mosaic"])
def test_seestar_frames_in_each_output_mode(tmp_path: Path, mode: str) -> None:
    """Two Seestar S50 frames (GRBG, 1080x1920), aligned and stacked."""
    out = tmp_path / "out"
    plan, published = _pipeline(
        _few("seestar-s50-ngc7023", tmp_path, SEESTAR), out, mode, align=True, stack=True
    )
    assert {entry["cfa"] for entry in plan} == {"GRBG"}
    made = _outputs(out)
    assert all(item["status"] == "written" for item in published.values())
    if mode == "channels":  # a stack of each channel, of 2x2 cells
        assert sorted(v for v in made.values()) == [((960, 540), f, 2) for f in ("TB", "TG", "TR")]
    elif mode == "green":
        assert list(made.values()) == [((960, 540), "TG", 2)]
    elif mode == "rgb":
        assert list(made.values()) == [((3, 1920, 1080), "RGB", 2)]
    else:  # a mosaic is never resampled: each frame is an output of its own, not stacked
        assert sorted(made.values()) == [((1920, 1080), "IRCUT", 1)] * 2
        assert all(fits.getheader(out / name)["BAYERPAT"] == "GRBG" for name in made)
    shifts = [s for item in published.values() for s in item.get("shifts", {}).values()]
    assert all(_registered(s) for s in shifts) and (mode == "mosaic") == (not shifts)


def _registered(shift: dict) -> bool:
    """A frame registered with confidence: by 20 stars or more, or a clear correlation peak."""
    return shift["stars"] >= 20 if shift["method"] == "stars" else shift["significance"] > 30


@pytest.mark.parametrize("mode", ["channels", "green", "rgb", "mosaic"])
def test_indi_asi224mc_frames_in_each_output_mode_binned(tmp_path: Path, mode: str) -> None:
    """Two ASI224MC frames (RGGB, 1304x976) with -b 2: colours never mixed; a mosaic refuses it."""
    out = tmp_path / "out"
    plan, _ = _pipeline(_few("indi-asi224mc-m27", tmp_path, INDI), out, mode, binning=2)
    made = _outputs(out)
    if mode == "mosaic":
        assert made == {} and {e["status"] for e in plan} == {"skipped"}
        assert "a raw mosaic is not binned" in plan[0]["reason"]
        return
    shapes = {"channels": (488, 652), "green": (488, 652), "rgb": (3, 488, 652)}
    filters = {"channels": ["TB", "TG", "TR"], "green": ["TG"], "rgb": ["RGB"]}[mode]
    assert sorted(made.values()) == sorted((shapes[mode], f, 1) for f in filters for _ in INDI)
    levels = {}
    for name, (_, filt, _) in made.items():
        data = fits.getdata(out / name)
        levels[filt] = np.median(data[2] if data.ndim == 3 else data)
    if mode == "channels":  # the sky's colour as measured on the raw sites: R 232, G 240, B 96
        assert levels["TB"] < 0.5 * levels["TG"] and 0.8 < levels["TR"] / levels["TG"] < 1.1


@pytest.mark.parametrize("mode", ["channels", "green", "rgb", "mosaic"])
def test_panoptes_dslr_crops_in_each_output_mode(tmp_path: Path, mode: str) -> None:
    """The DSLR crops' pattern is FILTER='RGGB' (GBRG as stored); pole.fits says no pattern and
    stays mono."""
    out = tmp_path / "out"
    plan, _ = _pipeline(_few("panoptes-dslr-testcrops", tmp_path, PANOPTES), out, mode)
    cfa = {Path(e["path"]).name: e.get("cfa") for e in plan}
    assert cfa == {"solved.fits.fz": "GBRG", "tiny.fits": "GBRG", "pole.fits": None}
    made = _outputs(out)
    mono = [v for v in made.values() if v[1] == ""]
    assert mono == [((200, 200), "", 1)]  # pole.fits as before
    colour = sorted(v for v in made.values() if v[1] != "")
    expected = {
        "channels": [((100, 100), f, 1) for f in ("TB", "TG", "TR")]
        + [((350, 350), f, 1) for f in ("TB", "TG", "TR")],
        "green": [((100, 100), "TG", 1), ((350, 350), "TG", 1)],
        "rgb": [((3, 200, 200), "RGB", 1), ((3, 700, 700), "RGB", 1)],
        "mosaic": [((200, 200), "RGGB", 1), ((700, 700), "RGGB", 1)],
    }[mode]
    assert colour == sorted(expected)
    if mode == "channels":  # MEASRGGB='474 1024 1024 718': red lowest above the black level
        tg = next(n for n, v in made.items() if v == ((350, 350), "TG", 1))
        tr = tg.replace("_TG_", "_TR_")
        assert np.median(fits.getdata(out / tr)) < np.median(fits.getdata(out / tg))


def test_a_mono_night_is_the_same_whatever_the_colour_settings(tmp_path: Path) -> None:
    """Colour settings leave a mono night's outputs byte for byte (aligned and stacked)."""
    night = make_night(tmp_path / "night", SMALL)
    outputs = []
    for mode in ("channels", "green", "rgb", "mosaic"):
        out = tmp_path / mode
        _pipeline(night.lights[0].parent, out, mode, align=True, stack=True)
        outputs.append(sha256_tree(out))
    assert len(outputs[0]) == 2 and all(found == outputs[0] for found in outputs)
