"""The shared real data sets (../shared/data/real), end to end: what a careful observer expects
of each, calibrate-only and, where a set has a sequence of one camera, ``-s -S 1 -a``.

Each set's README gives its provenance and header oddities. The tests skip where ../shared is
absent (a user's clone) and fail there under IMGPROC_REQUIRE_REAL=1 (CI). TIRCAM2's masters
made outside imgproc are tested in test_real_tircam2.py.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from conftest import fitsverify_errors, real_set, run_cli
from test_timecards import aij_mid_jd, exotic_mid_jd, name_jd

from imgproc.cli import EXIT_INCOMPLETE, EXIT_OK
from imgproc.manifest import read_tsv
from imgproc.naming import mean_time, output_name

pytestmark = pytest.mark.e2e


class Run:
    """One run of the imgproc command on a real set: its exit status and what it left."""

    def __init__(self, out: Path, status: int) -> None:
        self.out, self.status = out, status
        self.summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
        self.manifest = read_tsv(out / "work" / "manifest.tsv")

    def outputs(self) -> list[Path]:
        return sorted(self.out.glob("*.fits"))

    def shifts(self) -> dict[str, dict[str, float]]:
        """Every registered frame's shift record, from the publish receipts."""
        found: dict[str, dict[str, float]] = {}
        for receipt in (self.out / "work" / "published").glob("*.json"):
            for item in json.loads(receipt.read_text())["items"].values():
                found |= item.get("shifts", {})
        return found


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """``run(name, *args)``: the command on real set ``name`` (arguments relative to its folder),
    run once per module and shared by the tests that read it."""
    done: dict[tuple, Run] = {}

    def go(name: str, *args: str) -> Run:
        if (name, *args) not in done:
            folder = real_set(name)
            out = tmp_path_factory.mktemp(name)
            flags = [str(folder / a) if (folder / a).exists() else a for a in args]
            done[(name, *args)] = Run(out, run_cli(*flags[:1], out, *flags[1:]))
        return done[(name, *args)]

    return go


def mid(path: Path) -> datetime:
    header = fits.getheader(path)
    return datetime.fromisoformat(header["DATE-OBS"]) + timedelta(seconds=float(header["EXPTIME"]) / 2)


# --- SBIG ST-8 + MaxIm DL: raw bias, darks of 300 s and 3 s, flats, 9 lights of 1530x1020 -----

UMD = "umd-st8-maximdl-ngc520-r"
UMD_MASTERS = ("-B", "bias", "-D", "darks", "-F", "flats")


def test_umd_masters_are_built_and_every_light_calibrated(run) -> None:
    result = run(UMD, "lights", *UMD_MASTERS)
    assert result.status == EXIT_OK and result.summary["complete"]
    built = sorted(Path(p).name.rsplit("_", 1)[0] for p in result.summary["masters_built"])
    assert built == ["master_bias", "master_dark_300s", "master_dark_3s", "master_flat_Sloan_r_"]
    lights = sorted((real_set(UMD) / "lights").glob("*.fit"))
    # blank OBJECT -> UNKNOWN; FILTER "Sloan r'" -> Sloan_r_; the JD is mid-exposure
    expected = {output_name(None, "DGAH", "Sloan r'", mid(light)): light for light in lights}
    assert [p.name for p in result.outputs()] == sorted(expected)
    masters = result.out / "masters"
    bias = fits.getdata(next(masters.glob("master_bias_*.fits"))).astype(np.float64)
    dark = fits.getdata(next(masters.glob("master_dark_300s_*.fits"))).astype(np.float64)
    flat = fits.getdata(next(masters.glob("master_flat_*.fits"))).astype(np.float64)
    flat /= flat[flat > 0].mean()
    name, light = next(iter(expected.items()))
    with fits.open(result.out / name) as hdul:
        header, data = hdul[0].header, hdul[0].data
    assert header["BIASCAL"] and header["DARKCAL"] and header["FLATCAL"] and "DARKSCAL" not in header
    assert header["DARKFILE"].startswith("master_dark_300s_")  # the lights' own exposure
    raw = fits.getdata(light).astype(np.float64)
    np.testing.assert_allclose(data, (raw - bias - dark) / flat, rtol=1e-5, atol=1e-2)
    assert 600 < np.nanmedian(data) < 1000  # sky of the dark-subtracted 300 s frames


def test_umd_aligned_stack_of_the_whole_sequence(run) -> None:
    result = run(UMD, "lights", *UMD_MASTERS, "-s", "-S", "1", "-a")
    assert result.status == EXIT_OK and result.summary["complete"]
    [stack] = result.outputs()
    lights = sorted((real_set(UMD) / "lights").glob("*.fit"))
    assert stack.name == output_name(None, "DGAH", "Sloan r'", mean_time([mid(p) for p in lights]))
    header = fits.getheader(stack)
    assert header["NCOMBINE"] == 9 and (header["NAXIS1"], header["NAXIS2"]) == (1530, 1020)
    shifts = result.shifts()
    # wide faint stars (FWHM 11-17 px, ~40 a frame): too loose a star fit, cross-correlation instead
    # (but the reference frame itself, whose stars match exactly)
    others = [s for s in shifts.values() if s["dx"] or s["dy"]]
    assert len(shifts) == 9 and len(others) == 8 and all(s["method"] == "correlation" for s in others)
    assert min(s["significance"] for s in others) > 50
    assert max(abs(s["dy"]) + abs(s["dx"]) for s in shifts.values()) > 40  # the field drifts


# --- TIRCAM2: one folder holding lights, bias and flats, no IMAGETYP ---------------------------

TIRCAM = "tircam2-ic310"


def test_tircam2_one_folder_gives_lights_bias_and_flat_by_file_name(run) -> None:
    result = run(TIRCAM, ".", "-B", ".", "-F", ".")
    assert result.status == EXIT_OK and result.summary["complete"]
    assert len(result.outputs()) == 5 and result.summary["lights"] == 5
    listed = {(Path(item["file"]).name, item["reason"]) for item in result.summary["listed"]}
    assert (
        "bias_1.fits",
        "bias frame (from its file name) in the light folder: listed, not processed",
    ) in listed
    assert (
        "flats05.fits",
        "flat frame (from its file name) in the light folder: listed, not processed",
    ) in listed
    assert ("IC310_1.fits", "light frame in the flat folder: listed, not used") in listed
    masters = {
        fits.getheader(p)["IMAGETYP"]: fits.getheader(p) for p in (result.out / "masters").glob("*.fits")
    }
    assert masters["masterBIAS"]["NCOMBINE"] == 3 and masters["masterFLAT"]["NCOMBINE"] == 5
    inputs = {card.split()[-1] for card in masters["masterFLAT"]["HISTORY"] if card.startswith("input ")}
    assert inputs == {f"flats0{i}.fits" for i in range(1, 6)}
    for output in result.outputs():
        header = fits.getheader(output)
        assert output.name.startswith("UNKNOWN_DGAH_J_20221023_")  # OBJECT='None', FILTER1='J'
        assert header["BIASCAL"] and header["FLATCAL"] and not header["DARKCAL"]


def test_tircam2_stack_of_five(run) -> None:
    result = run(TIRCAM, ".", "-s", "-S", "1", "-a")
    assert result.status == EXIT_OK and result.summary["uncalibrated"]
    [stack] = result.outputs()
    assert fits.getheader(stack)["NCOMBINE"] == 5
    assert all(abs(s["dy"]) < 0.5 and abs(s["dx"]) < 0.5 for s in result.shifts().values())  # no dither


# --- Seestar S50: a tree, colour (GRBG) frames of two units, 1080x1920 portrait --------------

SEESTAR = "seestar-s50-ngc7023"


def test_seestar_tree_is_searched_and_colour_split_into_channels(run) -> None:
    result = run(SEESTAR, ".")
    assert result.status == EXIT_OK and result.summary["uncalibrated"]
    names = [p.name for p in result.outputs()]
    assert len(names) == 18 and sorted({n.split("_")[3] for n in names}) == ["TB", "TG", "TR"]
    assert all(n.startswith("NGC_7023_DGAH_T") for n in names)
    assert {item["bayerpat"] for item in result.summary["colour"]} == {"GRBG"}
    assert len(result.summary["colour"]) == 6
    assert fits.getdata(result.outputs()[0]).shape == (960, 540)  # portrait, of 2x2 CFA cells


def test_seestar_sequences_stack_aligned_on_superpixels(run) -> None:
    result = run(SEESTAR, ".", "-s", "-S", "1", "-a")
    assert result.status == EXIT_OK and result.summary["complete"]
    # 10 s and 20 s, each channel stacked, registered on its green frame
    assert sorted(fits.getheader(p)["NCOMBINE"] for p in result.outputs()) == [2, 2, 2, 4, 4, 4]
    shifts = result.shifts()
    # stars matched on each light's green frame, every channel moved alike: the alt-az frames of
    # 2024 turn by 0.05° a frame
    assert len(shifts) == 18 and all(s["method"] == "stars" and s["stars"] >= 100 for s in shifts.values())
    assert max(s["residual"] for s in shifts.values()) < 0.6
    assert max(abs(s["rotation"]) for s in shifts.values()) > 0.1
    by_light = {}
    for fid, shift in shifts.items():
        by_light.setdefault(fid.rsplit("-", 1)[0], set()).add((shift["dy"], shift["dx"]))
    assert len(by_light) == 6 and all(len(moves) == 1 for moves in by_light.values())


# --- INDI ASI224MC: the type in FRAME, RGGB, 1304x976 ------------------------------------------

INDI = "indi-asi224mc-m27"


def test_indi_frames_are_lights_by_frame_and_stack(run) -> None:
    single = run(INDI, ".")
    assert single.status == EXIT_OK and len(single.outputs()) == 18  # TR, TG, TB of each
    assert {(r["type_source"], r["role"]) for r in single.manifest} == {("FRAME", "light")}
    assert {item["bayerpat"] for item in single.summary["colour"]} == {"RGGB"}
    stacked = run(INDI, ".", "-s", "-S", "1", "-a")
    assert stacked.status == EXIT_OK
    stacks = stacked.outputs()
    assert [fits.getheader(p)["NCOMBINE"] for p in stacks] == [6, 6, 6]
    assert [p.name[:27] for p in stacks] == [f"UNKNOWN_DGAH_{f}_20180907_24" for f in ("TB", "TG", "TR")]


# --- PANOPTES DSLR crops: .fz extension, pattern in FILTER, a header-stripped file ---------------

PANOPTES = "panoptes-dslr-testcrops"


def test_panoptes_crops_read_skip_and_report(run) -> None:
    result = run(PANOPTES, ".")
    assert result.status == EXIT_INCOMPLETE
    skipped = {Path(item["file"]).name: item["reason"] for item in result.summary["skipped"]}
    assert skipped == {
        "noheader.fits": "DATE-OBS is missing: the mid-exposure time cannot be computed",
        # a crop of the same exposure as tiny.fits: same object, filter and time, so same name
        "unsolved.fits": "; ".join(
            f"output name UNKNOWN_DGAH_{f}_20160909_2457640.84266435.fits is already made from tiny.fits"
            for f in ("TR", "TG", "TB")
        ),
    }
    # solved and tiny: TR, TG and TB each; pole and rotation (no pattern in the header): mono
    assert len(result.outputs()) == 8 and len(result.summary["skipped"]) == 2
    solved = next(r for r in result.manifest if r["path"].endswith("solved.fits.fz"))
    # FILTER='RGGB' read top-down; 700 rows stored bottom-up
    assert (solved["hdu"], solved["ny"], solved["nx"], solved["bayerpat"]) == (1, 700, 700, "GBRG")
    start = datetime.fromisoformat("2016-09-09T08:14:34")
    name = output_name(None, "DGAH", "TG", start + timedelta(seconds=120.4 / 2))
    assert fits.getdata(result.out / name).shape == (350, 350)


def test_panoptes_aligned_frames_are_registered_to_a_frame_still_planned(run) -> None:
    """unsolved.fits, first of the 700 px crops, is skipped for its name: solved.fits, the other,
    is its sequence's reference (it was registered to the skipped one, and not written)."""
    result = run(PANOPTES, ".", "-a")
    assert result.status == EXIT_INCOMPLETE and len(result.summary["skipped"]) == 2
    assert len(result.outputs()) == 8
    solved = [
        row for row in read_tsv(result.out / "work" / "plan.tsv") if row["path"].endswith("/solved.fits.fz")
    ]
    assert {row["reference"] for row in solved} == {
        next(r["frame_id"] for r in solved if r["channel"] == "G")
    }


# --- every set: the times EXOTIC and AstroImageJ read (issue 19) ---------------------------------


@pytest.mark.parametrize(
    "args",
    [
        (UMD, "lights", *UMD_MASTERS),
        (UMD, "lights", *UMD_MASTERS, "-s", "-S", "1", "-a"),
        (TIRCAM, ".", "-B", ".", "-F", "."),
        (TIRCAM, ".", "-s", "-S", "1", "-a"),
        (SEESTAR, "."),
        (SEESTAR, ".", "-s", "-S", "1", "-a"),
        (INDI, "."),
        (INDI, ".", "-s", "-S", "1", "-a"),
        (PANOPTES, "."),
    ],
    ids=lambda args: " ".join(args[:1] + args[2:]),
)
def test_exotic_and_astroimagej_read_the_time_of_the_name(run, args: tuple[str, ...]) -> None:
    """Both clients' reading rules give every output's name JD back, and fitsverify finds no
    error (the runs of the tests above, shared: no run of its own)."""
    outputs = run(*args).outputs()
    assert outputs
    for path in outputs:
        assert fitsverify_errors(path) == ""  # PANOPTES's EQUINOX = '' is not carried over
        header = fits.getheader(path)
        for rule in (exotic_mid_jd, aij_mid_jd):
            assert abs(rule(header) - name_jd(path)) * 86400 < 0.010, (path.name, rule.__name__)
