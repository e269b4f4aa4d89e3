"""The HTML report: content from a real small run, PNG thumbnails, escaping, and a headless browser."""

from __future__ import annotations

import base64
import html
import re
import shutil
import struct
import subprocess
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from conftest import REPO, master_flags, run_cli

import imgproc.report as report
from imgproc.cli import EXIT_INCOMPLETE
from imgproc.fitsio import Float32Rows, write_atomic
from imgproc.manifest import read_tsv
from imgproc.report import (
    NAN_RGB,
    THUMB_MAX,
    _plots_html,
    build_report,
    png_bytes,
    svg_plot,
    thumbnail,
    time_ticks,
    write_report,
)
from imgproc.stamps import read_json
from imgproc.synth import Night

EVIL = "<script>alert('x')</script> & Co"
CARD = re.compile(
    r'<div class="thumb" data-output="([^"]+)"><img src="data:image/png;base64,([A-Za-z0-9+/=]+)"'
)


def decode_png(data: bytes) -> tuple[int, int, np.ndarray]:
    """Width, height and RGB pixels of an 8-bit palette, unfiltered PNG; checks the signature
    and every chunk's CRC (what the report's own writer makes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(tag + body) == crc, f"bad CRC in {tag!r}"
        chunks.append((tag, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[1][0] == b"PLTE" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour) == (8, 3)
    palette = np.frombuffer(chunks[1][1], dtype=np.uint8).reshape(-1, 3)
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + width)
    assert (rows[:, 0] == 0).all()
    return width, height, palette[rows[:, 1:]]


@pytest.fixture(scope="module")
def run(small_night_template: Night, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One aligned, stacked run of the small night with a light whose OBJECT is hostile HTML, a
    bias frame in the light folder (listed) and an unreadable file (skipped)."""
    root = tmp_path_factory.mktemp("report") / "night"
    shutil.copytree(small_night_template.root, root)
    night = Night(root, [], root / "bias", root / "darks", root / "flats", {}, {})
    evil_light = sorted((root / "lights").glob("*.fits"))[-1]
    fits.setval(evil_light, "OBJECT", value=EVIL)
    listed = root / "lights" / sorted(night.bias_dir.glob("*.fits"))[0].name
    shutil.copy(sorted(night.bias_dir.glob("*.fits"))[0], listed)
    broken = root / "lights" / "broken&'frame.fits"
    broken.write_bytes(b"not a FITS file")
    out = root.parent / "out"
    assert run_cli(root / "lights", out, *master_flags(night), "-a", "-s", "-S", "2") == EXIT_INCOMPLETE
    return {"out": out, "evil": evil_light, "listed": listed, "broken": broken, "html": build_report(out)}


def test_report_shows_every_output_as_a_png_thumbnail(run: dict) -> None:
    out, page = run["out"], run["html"]
    outputs = read_json(out / "summary.json")["output_files"]
    assert outputs and sorted(outputs) == sorted(p.name for p in out.glob("*.fits"))
    cards = dict(CARD.findall(page))
    assert sorted(html.unescape(name) for name in cards) == sorted(outputs)
    assert page.count("<img ") == len(outputs)
    for name in outputs:
        assert html.escape(name) in page
        width, height, pixels = decode_png(base64.b64decode(cards[html.escape(name)]))
        ny, nx = fits.getdata(out / name).shape
        assert (height, width) == (ny, nx)  # 64 x 64: no downsampling needed
        assert pixels.std() > 0  # an image, not a blank
        with fits.open(out / name) as hdul:
            header = hdul[0].header
        assert f"DATE-AVG {header['DATE-AVG']}" in page
        assert f"NCOMBINE {header.get('NCOMBINE', 1)}" in page


def test_report_tables(run: dict) -> None:
    out, page = run["out"], run["html"]
    plan = read_tsv(out / "work" / "plan.tsv")
    assert page.count("data-frame=") == len(plan)
    frames = page[
        page.index('<table id="frames">') : page.index("</table>", page.index('<table id="frames">'))
    ]
    published = {}
    for receipt in (out / "work" / "published").glob("*.json"):
        published.update(read_json(receipt)["items"])
    shifts = {fid: s for item in published.values() for fid, s in item["shifts"].items()}
    for entry in plan:
        row = re.search(rf'<tr class="[^"]*" data-frame="{re.escape(entry["frame_id"])}">(.*?)</tr>', frames)
        assert row, entry["frame_id"]
        cells = row.group(1)
        assert Path(entry["path"]).name in cells and html.escape(entry["output"]) in cells
        assert f">{shifts[entry['frame_id']]['dx']:.3f}<" in cells  # aligned: every frame has a shift
        for role in ("bias", "dark", "flat"):
            assert f"{role}: " in cells and Path(entry[role]).name in cells
        assert "calibrated, written" in cells
    masters = page[page.index('<table id="masters">') :]
    masters = masters[: masters.index("</table>")]
    for role in ("bias", "dark", "flat"):
        for path in {entry[role] for entry in plan}:
            used = sum(1 for entry in plan if entry[role] == path)
            assert re.search(rf"{re.escape(Path(path).name)}</td><td class=\"num\">{used}</td>", masters)
    skipped = page[page.index('<table id="skipped">') :]
    assert html.escape(run["broken"].name) in skipped[: skipped.index("</table>")]
    listed = page[page.index('<table id="listed">') :]
    assert run["listed"].name in listed[: listed.index("</table>")]
    assert "INCOMPLETE" in page
    config = (out / "imgproc.yaml").read_text(encoding="utf-8")
    assert f'<pre id="config-text">{html.escape(config)}</pre>' in page
    for package in ("imgproc", "python", "numpy", "astropy", "snakemake"):
        assert f"<td>{package}</td>" in page
    assert '<svg xmlns="http://www.w3.org/2000/svg"' in page and "Alignment shift, filter V" in page


def test_report_escapes_header_strings_and_is_self_contained(run: dict) -> None:
    page = run["html"]
    assert html.escape(EVIL) in page  # the hostile OBJECT is shown, escaped
    assert "<script>alert" not in page and page.count("<script>") == 1  # only the report's own script
    assert not re.search(r"(src|href)=\"(?!data:)", page), "every resource must be inline"
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    assert build_report(run["out"]) == page  # deterministic


def test_write_report_is_atomic(run: dict, tmp_path: Path) -> None:
    target = write_report(run["out"], tmp_path / "sub" / "report.html")
    assert target.read_text(encoding="utf-8") == run["html"]
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]


def test_thumbnail_downsamples_and_marks_nan(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(100, 5, (300, 520)).astype(np.float32)
    data[:30] = np.nan  # 30 rows without data at the bottom
    data[150, 260] = 5000
    fits.PrimaryHDU(data).writeto(tmp_path / "big.fits")
    thumb = thumbnail(tmp_path / "big.fits")
    width, height, pixels = decode_png(thumb["png"])
    assert thumb["factor"] == 3 and (width, height) == (174, 100) and max(width, height) <= THUMB_MAX
    assert (pixels[-10:] == NAN_RGB).all()  # bottom rows (last PNG rows) are the NaN colour
    assert not (pixels[:80] == NAN_RGB).all(axis=2).any()
    assert thumb["stars"] >= 1


def test_a_float32_file_thumbnail_is_read_in_strips_not_mapped_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thumbnail of an imgproc float32 file (a 61-MP output) reads it a strip of rows at a
    time, the same bits as the thumbnail of the array: a memory map read through would keep
    every page of the frame in the process until it is closed."""
    rng = np.random.default_rng(4)
    data = rng.normal(100, 5, (333, 517)).astype(np.float32)
    data[200:204, 300:304] = 3000.0
    data[:7] = np.nan
    write_atomic(tmp_path / "frame.fits", data, fits.Header({"FILTER": "V"}))
    reads: list[tuple[int, int]] = []
    original = Float32Rows.read
    monkeypatch.setattr(Float32Rows, "read", lambda self, a, b: reads.append((a, b)) or original(self, a, b))
    monkeypatch.setattr(report, "STRIP_BYTES", 64 * 1024)
    monkeypatch.setattr(report, "open_output", None)  # never through astropy's memory map
    thumb = thumbnail(tmp_path / "frame.fits")
    assert len(reads) > 3 and [a for a, _ in reads] == sorted({b for _, b in reads} - {333} | {0})
    assert reads[-1][1] == 333
    whole = report.thumbnail_of(data, fits.Header({"FILTER": "V"}))
    assert thumb == whole and thumb["stars"] >= 1 and thumb["header"]["FILTER"] == "V"


def test_png_writer_round_trip() -> None:
    indices = np.array([[0, 127, 254], [255, 1, 200]], dtype=np.uint8)
    width, height, pixels = decode_png(png_bytes(indices))
    assert (width, height) == (3, 2)
    assert (pixels[0, :, 0] == [0, 128, 255]).all() and (pixels[1, 1] == 1).all()  # greys
    assert tuple(pixels[1, 0]) == NAN_RGB


def test_workflow_writes_the_report(run: dict) -> None:
    if "rules/report.smk" not in (REPO / "Snakefile").read_text(encoding="utf-8"):
        pytest.skip("rules/report.smk is not included in the Snakefile")
    assert (run["out"] / "report.html").read_text(encoding="utf-8") == run["html"]


CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip


def test_report_renders_in_headless_chromium(run: dict, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not on PATH (Debian: apt-get install -y chromium)")
    report = write_report(run["out"], tmp_path / "report.html")
    n_outputs = len(read_json(run["out"] / "summary.json")["output_files"])
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom",
         report.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    assert f'data-images-loaded="{n_outputs}"' in body.group(0), body.group(0)
    assert f'data-images-total="{n_outputs}"' in body.group(0)
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={shot}",
         "--window-size=1280,2000", report.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (1280, 2000)


def test_sampling_note_counts_the_lone_frames_shown() -> None:
    from imgproc.report import _sampling_note

    plan = [{"output": f"f{i}.fits", "pub_kind": "link", "thumb": i % 3 == 0} for i in range(9)] + [
        {"output": "stack.fits", "pub_kind": "stack", "thumb": True}
    ]
    outputs = [row["output"] for row in plan]
    assert "Thumbnails of 3 of the 9 calibrated single frames" in _sampling_note(plan, outputs)
    every = [dict(row, thumb=True) for row in plan]
    assert _sampling_note(every, outputs) == ""


def test_a_light_in_the_bias_folder_is_reported_not_counted_as_a_master(night: Night, tmp_path: Path) -> None:
    shutil.copy(night.lights[0], night.bias_dir / "stray_light.fits")  # a light saved among the biases
    out = tmp_path / "out"
    assert run_cli(night.root / "lights", out, *master_flags(night)) == 0
    page = (out / "report.html").read_text()
    masters = page[page.index('id="master-usage"') : page.index('id="problems"')]
    assert "stray_light.fits" not in masters
    problems = page[page.index('id="problems"') :]
    assert "stray_light.fits" in problems and "in the bias folder" in problems


def test_time_ticks_stay_few_over_any_span() -> None:
    minutes_per_day = 1440
    for span_days in (0.01, 0.5, 3, 334, 9400 * 365.25):
        ticks = time_ticks(0.0, span_days * minutes_per_day)
        assert 1 <= len(ticks) <= 9
        if span_days > 8:
            assert all(t % minutes_per_day == 0 for t in ticks)  # whole days


def _plot_row(name: str, mid: str) -> dict:
    return {"name": name, "mid": mid, "filter": "V", "sequence": "s", "sky": 100.0,
            "shift": {"dx": 0.1, "dy": -0.2}}  # fmt: skip


def test_plots_leave_out_absurd_dates_with_a_note() -> None:
    rows = [_plot_row(f"f{i}.fits", f"2025-05-01T21:0{i}:00") for i in range(5)]
    rows += [
        _plot_row("year1.fits", "0001-01-01T00:00:30"),
        _plot_row("year9999.fits", "9999-12-31T23:59:00"),
    ]
    page = _plots_html(rows)
    note = re.search(r'<p class="muted" id="not-plotted">(.*?)</p>', page).group(1)
    assert note.startswith("2 frames dated more than 366 days") and note.endswith("year1.fits, year9999.fits")
    assert len(page) < 30_000 and page.count("<circle") == 5 * 3  # dx, dy and sky of the five


def test_a_plot_over_months_labels_its_ticks_with_dates() -> None:
    origin = datetime(2024, 7, 31, 2, 44)
    points = [(0.0, 1.0, "a", "s"), (334 * 1440.0, 2.0, "b", "s")]
    svg = svg_plot("sky", [("sky", points)], origin, "ADU")
    labels = re.findall(r'text-anchor="middle">(\d{4}-\d{2}-\d{2})</text>', svg)
    assert 3 <= len(labels) <= 9 and labels[0] >= "2024-07-31" and labels[-1] <= "2025-06-30"
