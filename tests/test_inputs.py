"""Input trees, frame-type dialects and image extensions: which files a night is made of and
what each one is (imgproc.manifest.list_fits, imgproc.keywords, imgproc.fitsio, the command)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.io import fits
from conftest import REPO, master_flags, real_set, run_cli
from hypothesis import given
from hypothesis import strategies as st

from imgproc.cli import EXIT_OK, default_output_dir
from imgproc.dag import Layout
from imgproc.fitsio import read_header, read_image
from imgproc.keywords import DEFAULT_KEYWORDS, frame_type, name_type, normalise
from imgproc.manifest import LISTED, OK, SKIPPED, list_fits, read_tsv
from imgproc.plan import format_plan, frame_id
from imgproc.scan import ScanRequest, scan

SHAPE = (53, 70)  # (ny, nx)
LIGHT = {"OBJECT": "M 27", "FILTER": "V", "EXPTIME": 30.0, "INSTRUME": "Cam", "GAIN": 100}


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(900, 1400, SHAPE).astype(np.uint16)


def _fits(path: Path, cards: dict, seed: int = 0) -> Path:
    """A plain camera file: uint16 pixels in the primary HDU, ``cards`` in its header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(_pixels(seed), header=fits.Header(cards)).writeto(path)
    return path


def _lco(path: Path, cards: dict, seed: int = 0, primary: dict | None = None) -> Path:
    """An LCO-style archive file: a primary HDU with no image and a few cards, the image and the
    observation's keywords in a tile-compressed ``SCI`` extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head = fits.PrimaryHDU(header=fits.Header(primary or {"ORIGIN": "LCOGT", "TELESCOP": "1m0-10"}))
    sci = fits.CompImageHDU(_pixels(seed), header=fits.Header(cards), name="SCI")
    fits.HDUList([head, sci]).writeto(path)
    return path


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _names(paths: list[Path], root: Path) -> list[str]:
    return [str(path.relative_to(root)) for path in paths]


# --- the search of a tree ---------------------------------------------------------------------


def test_list_fits_searches_subfolders_in_path_order_without_hidden_ones(tmp_path: Path) -> None:
    for name in ("b.fits", "a/z.FIT", "a/deep/er/x.fits.fz", "c d/y.fts", ".hidden/h.fits", "a/.cache/h.fit",
                 ".dot.fits", "a/notes.txt", "a/deep/table.csv"):  # fmt: skip
        _touch(tmp_path / name)
    assert _names(list_fits(tmp_path), tmp_path) == ["a/deep/er/x.fits.fz", "a/z.FIT", "b.fits", "c d/y.fts"]


def test_list_fits_leaves_out_the_output_folder_and_other_imgproc_outputs(tmp_path: Path) -> None:
    _touch(tmp_path / "raw" / "bias_1.fits")
    _touch(tmp_path / "out" / "M27_DGAH_V_20250501_2460797.41.fits")
    _touch(tmp_path / "out" / "work" / "cal" / "bias_1-0123abcd.fits")
    _touch(tmp_path / "older" / "imgproc.yaml")  # an earlier run's output folder
    _touch(tmp_path / "older" / "master_bias.fits")
    assert _names(list_fits(tmp_path, [tmp_path / "out"]), tmp_path) == ["raw/bias_1.fits"]
    # a folder that is itself an output folder is searched when it is the one asked for
    assert _names(list_fits(tmp_path / "older"), tmp_path) == ["older/master_bias.fits"]
    assert len(list_fits(tmp_path, [tmp_path / "not-made-yet"])) == 3


def test_list_fits_follows_symlinked_folders_once_and_ends_on_a_loop(tmp_path: Path) -> None:
    root = tmp_path / "night"
    _touch(root / "s1" / "a.fits")
    _touch(tmp_path / "elsewhere" / "e.fits")
    (root / "s1" / "loop").symlink_to(root)  # a loop back to the top
    (root / "s0").symlink_to(root / "s1")  # the same folder by two paths
    (root / "zz-elsewhere").symlink_to(tmp_path / "elsewhere")
    (root / "s1" / "b.fits").symlink_to(root / "s1" / "a.fits")  # the same file by two names
    (root / "dangling").symlink_to(tmp_path / "gone")
    (root / "0-first.fits").symlink_to(root / "s1" / "a.fits")
    found = _names(list_fits(root), root)
    assert found == ["s1/a.fits", "zz-elsewhere/e.fits"]  # real paths where the tree has them
    request = ScanRequest(root)
    assert [path for path, _ in request.files()] == list_fits(root)


def test_equal_names_in_two_subfolders_are_two_frames(tmp_path: Path) -> None:
    first = _fits(tmp_path / "2025-05-01" / "Light_001.fits", {**LIGHT, "DATE-OBS": "2025-05-01T21:00:00"})
    second = _fits(
        tmp_path / "2025-05-02" / "Light_001.fits", {**LIGHT, "DATE-OBS": "2025-05-02T21:00:00"}, 1
    )
    rows = scan(ScanRequest(tmp_path))
    assert [row["path"] for row in rows] == [str(first), str(second)]
    assert [row["status"] for row in rows] == [OK, OK]
    ids = {frame_id(row["path"]) for row in rows}
    assert len(ids) == 2 and all(fid.startswith("Light_001-") for fid in ids)


def test_layout_inputs_leave_out_an_output_folder_inside_a_master_folder(tmp_path: Path) -> None:
    _touch(tmp_path / "lights" / "l.fits")
    _touch(tmp_path / "bias" / "2025" / "b.fits")
    _touch(tmp_path / "bias" / "out" / "work" / "cal" / "l-01234567.fits")
    config = {"input_dir": str(tmp_path / "lights"), "bias_dir": str(tmp_path / "bias"),
              "output_dir": str(tmp_path / "bias" / "out"), "keywords": DEFAULT_KEYWORDS,
              "limits": {"max_frame_mb": 1024}}  # fmt: skip
    layout = Layout(config)
    assert layout.input_files() == [
        str(tmp_path / "lights" / "l.fits"),
        str(tmp_path / "bias" / "2025" / "b.fits"),
    ]
    assert layout.scan_params()["exclude"] == [str(tmp_path / "bias" / "out")]


# --- frame types ------------------------------------------------------------------------------


def test_config_keyword_table_equals_the_default() -> None:
    config = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    assert config["keywords"] == DEFAULT_KEYWORDS


@pytest.mark.parametrize(
    ("key", "value", "kind"),
    [
        ("IMAGETYP", "Light Frame", "light"),  # MaxIm DL
        ("IMAGETYP", "Flat Field", "flat"),
        ("IMAGETYP", "Dark Frame", "dark"),
        ("IMAGETYP", "Bias Frame", "bias"),
        ("IMAGETYP", "DARKFLAT", "dark"),  # N.I.N.A.'s darks for flats
        ("FRAMETYP", "Dark", "dark"),
        ("FRAME", "Light", "light"),  # INDI
        ("FRAME", "Flat", "flat"),
        ("FRAME", "Bias", "bias"),
        ("OBSTYPE", "EXPOSE", "light"),  # LCO archive
        ("OBSTYPE", "STANDARD", "light"),
        ("OBSTYPE", "BIAS", "bias"),
        ("OBSTYPE", "ZERO", "bias"),
        ("OBSTYPE", "DARK", "dark"),
        ("OBSTYPE", "SKYFLAT", "flat"),
        ("OBSTYPE", "LAMPFLAT", "flat"),
        ("OBSTYPE", "DOMEFLAT", "flat"),
        ("OBSTYPE", "twilight flat", "flat"),
        ("OBSTYPE", "ARC", "other"),
        ("OBSTYPE", "GUIDE", "other"),
    ],
)
def test_frame_type_dialects(key: str, value: str, kind: str) -> None:
    values = normalise({key: value, "DATE-OBS": "2025-05-01T21:00:00"}, file_name="bias_1.fits")
    assert (values["imagetyp"], values["imagetyp_raw"], values["type_source"]) == (kind, value, key)
    assert frame_type(value) == kind


def test_imagetyp_wins_over_the_other_frame_type_keywords() -> None:
    values = normalise({"OBSTYPE": "SKYFLAT", "FRAME": "Dark", "IMAGETYP": "Light Frame"})
    assert (values["imagetyp"], values["type_source"]) == ("light", "IMAGETYP")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("bias_1.fits", "bias"),
        ("BIAS001.FIT", "bias"),
        ("biases-3.fits", "bias"),
        ("zero_003.fits", "bias"),
        ("flats01.fits", "flat"),
        ("calib-001-dark.fit", "dark"),
        ("Darks_300s_-10C_0004.fits", "dark"),
        ("skyflat_V_12.fits.fz", "flat"),
        ("MasterFlat_R.fits", "flat"),
        ("2025-05-01 dome flat 3.fits", "flat"),
        ("IC310_1.fits", None),
        ("Light_NGC 7023_10.0s_IRCUT_20240730-224510.fit", None),
        ("darkcloud_LDN1622_001.fits", None),  # an object, not a type
        ("flatiron_0003.fits", None),
        ("Barnard_Dark_Horse_0001.fits", "dark"),  # 'Dark' as a word does say dark
        ("offsetfield_01.fits", None),
        ("bias_for_flats_1.fits", None),  # two types: no guess
        ("M 27_zeropoint_05.fits", None),
        ("", None),
        (None, None),
    ],
)
def test_name_type_takes_whole_words_only(name: str | None, kind: str | None) -> None:
    assert name_type(name) == kind


@given(
    word=st.sampled_from(["bias", "zero", "dark", "flat"]),
    glued=st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=8),
    number=st.integers(0, 999),
)
def test_name_type_never_reads_a_word_glued_to_other_letters(word: str, glued: str, number: int) -> None:
    """'darkcloud', 'flatiron', 'nodark': a calibration word inside a longer word is no type
    (bar the plurals and the few prefixes name_type knows: 'flats', 'skyflat')."""
    before, after = f"{glued}{word}", f"{word}{glued}"
    if glued.lower() not in ("master", "sky", "dome", "lamp", "twilight"):
        assert name_type(f"M31_{before}_{number:03d}.fits") is None
    if glued.lower() not in ("s", "es"):
        assert name_type(f"{after}-{number}.fit") is None


def test_type_from_the_file_name_or_irafname_only_without_a_type_keyword() -> None:
    cards = {"DATE-OBS": "2022-10-23T08:31:24", "EXPTIME": "0", "FILTER1": "BLOCK"}
    by_name = normalise(cards, file_name="bias_1.fits")
    assert (by_name["imagetyp"], by_name["type_source"], by_name["imagetyp_raw"]) == (
        "bias",
        "file name",
        None,
    )
    by_iraf = normalise({**cards, "IRAFNAME": "flats_j_6s_01"}, file_name="img_0001.fits")
    assert (by_iraf["imagetyp"], by_iraf["type_source"]) == ("flat", "IRAFNAME")
    light = normalise({**cards, "EXPTIME": "40", "IRAFNAME": "IC310_j_10s_d1_015"}, file_name="IC310_1.fits")
    assert (light["imagetyp"], light["type_source"]) == (None, None)
    keyword = normalise({**cards, "IMAGETYP": "Light"}, file_name="bias_1.fits")
    assert (keyword["imagetyp"], keyword["type_source"]) == ("light", "IMAGETYP")
    placeholder = normalise({**cards, "IMAGETYP": "None"}, file_name="flats01.fits")
    assert (placeholder["imagetyp"], placeholder["type_source"]) == ("flat", "file name")


# --- images in an extension -------------------------------------------------------------------


def test_lco_sci_extension_is_read_with_its_keywords(tmp_path: Path) -> None:
    cards = {"OBSTYPE": "EXPOSE", "DATE-OBS": "2025-05-01T21:00:00.123", "EXPTIME": 30.0, "FILTER": "rp",
             "OBJECT": "M 27", "TELESCOP": "1m0-10 (SCI)"}  # fmt: skip
    path = _lco(tmp_path / "cpt1m010-fa16-20250501-0042-e00.fits.fz", cards, seed=3)
    header, hdu, shape = read_header(path)
    assert (hdu, shape) == (1, SHAPE)
    assert (header["NAXIS1"], header["NAXIS2"], header["BITPIX"]) == (70, 53, 16)
    for key, value in cards.items():
        assert header[key] == value  # the extension's own TELESCOP wins over the primary's
    assert header["ORIGIN"] == "LCOGT"  # a card only the primary has is merged in
    assert not {"XTENSION", "EXTNAME", "PCOUNT", "GCOUNT", "ZIMAGE", "ZCMPTYPE"} & set(header)
    assert list(header).count("SIMPLE") <= 1 and list(header).count("BITPIX") == 1
    data, image_header = read_image(path)
    np.testing.assert_array_equal(data, _pixels(3).astype(np.float32))
    assert image_header["OBSTYPE"] == "EXPOSE" and image_header["ORIGIN"] == "LCOGT"
    values = normalise(header, file_name=path.name)
    assert (values["imagetyp"], values["type_source"], values["date_obs"]) == (
        "light", "OBSTYPE", "2025-05-01T21:00:00.123",
    )  # fmt: skip


def test_extension_with_inherit_false_keeps_only_its_own_cards(tmp_path: Path) -> None:
    path = _lco(tmp_path / "x.fits.fz", {"OBSTYPE": "BIAS", "INHERIT": False}, primary={"ORIGIN": "LCOGT"})
    header = read_header(path)[0]
    assert "ORIGIN" not in header and header["OBSTYPE"] == "BIAS"


def test_gzipped_image_extension_behind_an_empty_primary(tmp_path: Path) -> None:
    path = tmp_path / "frame.fits.gz"
    sci = fits.ImageHDU(_pixels(4), header=fits.Header({"IMAGETYP": "LIGHT"}), name="SCI")
    hdul = fits.HDUList([fits.PrimaryHDU(header=fits.Header({"OBSERVER": "AB"})), sci])
    with gzip.open(path, "wb") as handle:
        hdul.writeto(handle)
    header, hdu, shape = read_header(path)
    assert (hdu, shape, header["OBSERVER"], header["IMAGETYP"]) == (1, SHAPE, "AB", "LIGHT")
    assert "XTENSION" not in header
    np.testing.assert_array_equal(read_image(path)[0], _pixels(4))


def test_real_panoptes_fz_reads_its_compressed_extension() -> None:
    path = real_set("panoptes-dslr-testcrops") / "lights" / "solved.fits.fz"
    header, hdu, shape = read_header(path)
    assert (hdu, shape) == (1, (700, 700))
    values = normalise(header, file_name=path.name)
    assert (values["date_obs"], values["exptime"], values["filter"]) == (
        "2016-09-09T08:14:34.000",
        120.4,
        "RGGB",
    )
    assert values["imagetyp"] is None and "XTENSION" not in header
    data = read_image(path)[0]
    assert data.shape == (700, 700) and 1500 < float(np.median(data)) < 3000


# --- listing calibration frames found among the lights ----------------------------------------


def test_archive_tree_lists_its_calibration_frames(tmp_path: Path) -> None:
    base = {"DATE-OBS": "2025-05-01T21:00:00", "EXPTIME": 30.0, "FILTER": "rp", "OBJECT": "M 27"}
    for index, obstype in enumerate(("EXPOSE", "BIAS", "DARK", "SKYFLAT")):
        _lco(tmp_path / "20250501" / f"cpt-{index:04d}.fits.fz", {**base, "OBSTYPE": obstype}, seed=index)
    rows = {Path(row["path"]).name: row for row in scan(ScanRequest(tmp_path))}
    assert rows["cpt-0000.fits.fz"]["status"] == OK and rows["cpt-0000.fits.fz"]["hdu"] == 1
    for name, kind in (
        ("cpt-0001.fits.fz", "bias"),
        ("cpt-0002.fits.fz", "dark"),
        ("cpt-0003.fits.fz", "flat"),
    ):
        row = rows[name]
        assert (row["status"], row["role"], row["type_source"]) == (LISTED, kind, "OBSTYPE")
        assert row["reason"] == (
            f"{kind} frame (OBSTYPE {row['imagetyp_raw']!r}) in the light folder: listed, not processed"
        )


def test_a_master_folder_frame_named_for_another_type_is_not_used(tmp_path: Path) -> None:
    _fits(tmp_path / "lights" / "l.fits", {**LIGHT, "DATE-OBS": "2025-05-01T21:00:00"})
    _fits(tmp_path / "bias" / "bias_1.fits", {"EXPTIME": 0.0})
    _fits(tmp_path / "bias" / "flats_1.fits", {"EXPTIME": 3.0})
    rows = scan(ScanRequest(tmp_path / "lights", {"bias": tmp_path / "bias"}))
    by_name = {Path(row["path"]).name: row for row in rows}
    assert by_name["bias_1.fits"]["status"] == OK
    assert by_name["flats_1.fits"]["status"] == SKIPPED
    assert by_name["flats_1.fits"]["reason"] == "flat frame (from its file name) in the bias folder"


def test_default_output_folder_is_named_for_the_earliest_light_of_the_tree(tmp_path: Path) -> None:
    night = tmp_path / "night"
    _fits(night / "bias_001.fits", {"OBJECT": "Bias", "EXPTIME": 0.0, "DATE-OBS": "2025-04-30T20:00:00"})
    _fits(night / "s2" / "Light_2.fits", {**LIGHT, "OBJECT": "M 57", "DATE-OBS": "2025-05-02T01:00:00"}, 1)
    _fits(night / "s1" / "Light_1.fits", {**LIGHT, "DATE-OBS": "2025-05-01T21:00:00"}, 2)
    _fits(night / ".trash" / "Light_0.fits", {**LIGHT, "OBJECT": "Old", "DATE-OBS": "2020-01-01T21:00:00"}, 3)
    assert default_output_dir(night, "AB", DEFAULT_KEYWORDS) == tmp_path / "M_27_2025-05-01_AB_CAL"


# --- the command on a tree --------------------------------------------------------------------


def _tree_night(root: Path) -> dict[str, str]:
    """A night as camera software writes it: sessions in subfolders, equal file names in two of
    them, calibration frames with and without IMAGETYP among the lights, an archive's .fz files
    and a hidden folder of thumbnails. Returns the expected listed reasons by relative path."""
    for session, day in (("2025-05-01", "01"), ("2025-05-02", "02")):
        for index in range(2):
            cards = {**LIGHT, "IMAGETYP": "Light Frame", "DATE-OBS": f"2025-05-{day}T21:0{index}:00"}
            _fits(root / session / f"Light_M27_{index + 1:03d}.fits", cards, seed=int(day) * 10 + index)
    _fits(root / "2025-05-02" / "bias_001.fits", {"EXPTIME": 0.0, "DATE-OBS": "2025-05-02T20:00:00"}, 50)
    _fits(
        root / "calib" / "Flat_V_001.fits",
        {**LIGHT, "IMAGETYP": "Flat Field", "DATE-OBS": "2025-05-02T20:10:00"},
        51,
    )
    _fits(root / "calib" / "flats02.fits", {**LIGHT, "DATE-OBS": "2025-05-02T20:11:00"}, 52)
    _lco(
        root / "archive" / "e00.fits.fz",
        {**LIGHT, "OBSTYPE": "EXPOSE", "DATE-OBS": "2025-05-03T02:00:00"},
        53,
    )
    _lco(
        root / "archive" / "f00.fits.fz",
        {**LIGHT, "OBSTYPE": "SKYFLAT", "DATE-OBS": "2025-05-03T03:00:00"},
        54,
    )
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "broken.fits").write_text("not FITS at all")
    types = {
        "2025-05-02/bias_001.fits": "bias frame (from its file name)",
        "archive/f00.fits.fz": "flat frame (OBSTYPE 'SKYFLAT')",
        "calib/Flat_V_001.fits": "flat frame (IMAGETYP 'Flat Field')",
        "calib/flats02.fits": "flat frame (from its file name)",
    }
    return {name: f"{kind} in the light folder: listed, not processed" for name, kind in types.items()}


def test_command_on_a_tree_processes_its_lights_and_lists_its_calibration_frames(tmp_path: Path) -> None:
    root = tmp_path / "night"
    listed = _tree_night(root)
    out = tmp_path / "out"
    assert run_cli(root, out, "-c", "1") == EXIT_OK
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["complete"] and summary["skipped"] == []
    assert (summary["lights"], summary["outputs"]) == (5, 5)
    assert len(list(out.glob("M_27_DGAH_V_*.fits"))) == 5
    assert {str(Path(item["file"]).relative_to(root)): item["reason"] for item in summary["listed"]} == listed
    text = (out / "summary.txt").read_text(encoding="utf-8")
    assert f"listed {root / '2025-05-02' / 'bias_001.fits'}: bias frame (from its file name)" in text
    manifest = read_tsv(out / "work" / "manifest.tsv")
    assert not any(".thumbnails" in row["path"] for row in manifest)
    sources = {Path(row["path"]).name: row["type_source"] for row in manifest}
    assert sources["e00.fits.fz"] == "OBSTYPE" and sources["Light_M27_001.fits"] == "IMAGETYP"
    plan = read_tsv(out / "work" / "plan.tsv")
    assert len({row["frame_id"] for row in plan}) == 5
    table = format_plan(plan, manifest)
    assert "2025-05-01/Light_M27_001.fits" in table and "2025-05-02/Light_M27_001.fits" in table
    for name, reason in listed.items():
        assert any(
            line.startswith(name) and line.endswith(f"LISTED: {reason}") for line in table.splitlines()
        )
    assert table.splitlines()[-1] == "5 lights -> 5 outputs; 4 files skipped or listed"


def test_plan_of_a_tree_shows_the_listed_files(tmp_path: Path) -> None:
    root = tmp_path / "night"
    listed = _tree_night(root)
    out = tmp_path / "plan"
    assert run_cli(root, out, "--plan", "-c", "1") == EXIT_OK
    text = (out / "plan.txt").read_text(encoding="utf-8")
    for name, reason in listed.items():
        assert f"LISTED: {reason}" in text and name in text
    assert not list(out.glob("*.fits"))


def test_command_output_inside_a_master_tree_is_not_scanned_as_masters(tmp_path: Path) -> None:
    lights = tmp_path / "lights"
    for index in range(2):
        _fits(
            lights / f"l{index}.fits",
            {**LIGHT, "IMAGETYP": "LIGHT", "DATE-OBS": f"2025-05-01T21:0{index}:00"},
            index,
        )
    bias = tmp_path / "bias"
    for index in range(3):
        cards = {"IMAGETYP": "Bias Frame", "INSTRUME": "Cam", "GAIN": 100, "DATE-OBS": "2025-05-01T20:00:00"}
        _fits(bias / f"2025-05-01/b{index}.fits", cards, seed=10 + index)
    out = bias / "out"
    assert run_cli(lights, out, "-B", bias, "-c", "1") == EXIT_OK
    assert run_cli(lights, out, "-B", bias, "-c", "1") == EXIT_OK  # its outputs are there now
    manifest = read_tsv(out / "work" / "manifest.tsv")
    assert sorted(Path(row["path"]).name for row in manifest if row["folder"] == "bias") == [
        "b0.fits", "b1.fits", "b2.fits",
    ]  # fmt: skip
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["complete"] and summary["outputs"] == 2 and len(summary["masters_built"]) == 1
    assert (out / summary["masters_built"][0]).is_file()


def test_a_plan_with_other_columns_is_made_again(night, tmp_path: Path) -> None:
    """A folder last run by a version of imgproc whose plan had other columns gets a new plan
    (the columns are a param of plan_frames), so no light is calibrated from a stale plan."""
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == EXIT_OK
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import imgproc.plan\nimgproc.plan.COLUMNS = (*imgproc.plan.COLUMNS, 'newer')\n", encoding="utf-8"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    result = subprocess.run(
        [sys.executable, str(REPO / "imgproc.py"), night.root / "lights", out, *master_flags(night)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == EXIT_OK, result.stderr[-2000:]
    header = (out / "work" / "plan.tsv").read_text(encoding="utf-8").splitlines()[0].split("\t")
    assert header[-1] == "newer"
    assert read_tsv(out / "work" / "plan.tsv")[0]["status"] == OK
