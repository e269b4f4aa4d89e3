"""The run report: one self-contained HTML page about an output folder.

Thumbnails of the final outputs (PNG as data: URIs, made here with numpy and zlib), a table of
every light (sky, noise, alignment shift, masters, output, status), inline SVG plots of the
shifts and the sky level against time per filter, the master usage, what was skipped or listed
and why, the configuration used and the software versions.  No external URL, no wall-clock
time: the same run gives the same page.  Every string that comes from a header or a file name
is HTML-escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import os
import platform
import struct
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning

from imgproc import __version__
from imgproc.binning import block_sum
from imgproc.fitsio import FitsError, Float32Rows
from imgproc.manifest import OK, read_tsv
from imgproc.plan import calibration_notes
from imgproc.stamps import read_json, receipt_items, write_json
from imgproc.stars import RowSource, regular_sample, robust_background, row_reader, thumbnail_stars

#: Longest side of a thumbnail, in pixels.
THUMB_MAX = 256
#: Long side of the thumbnail of a lone calibrated frame (a night may have thousands; the
#: report shows them at twice the size), made while the frame is calibrated.
FRAME_THUMB_MAX = 128
#: Rows of a frame taken at a time for its thumbnail (:func:`block_mean`), in bytes of float32.
STRIP_BYTES = 16 << 20
#: Colour of pixels without data (NaN) in the thumbnails.
NAN_RGB = (46, 92, 184)
ROLES = ("bias", "dark", "flat")
_SERIES_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
_PACKAGES = ("imgproc", "numpy", "astropy", "snakemake")

#: Sets data-images-loaded / data-images-total on <body> once every image has been decoded.
_IMAGE_CHECK = (
    "(function(){function check(){var imgs=document.images,n=0;"
    "for(var i=0;i<imgs.length;i++){if(imgs[i].complete&&imgs[i].naturalWidth>0){n++;}}"
    "document.body.dataset.imagesLoaded=String(n);document.body.dataset.imagesTotal=String(imgs.length);}"
    "if(document.readyState==='complete'){check();}else{window.addEventListener('load',check);}})();"
)

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.8em;margin:.5em 0;max-width:100%}
th,td{border:1px solid #d0d0d0;padding:.2em .4em;text-align:left;vertical-align:top}
td.file{overflow-wrap:anywhere;min-width:11em}td.nowrap{white-space:nowrap}
th{background:#f0f0f0;position:sticky;top:0}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.bad td{background:#fde8e8}tr.warn td{background:#fff6dc}
.thumbs{display:flex;flex-wrap:wrap;gap:12px}
.thumb{border:1px solid #ccc;padding:6px;width:270px;font-size:.78em;background:#fafafa}
.thumb img{display:block;margin:0 auto 4px auto;image-rendering:pixelated;background:#000}
.thumb .name{font-weight:600;word-break:break-all}
.plots{display:flex;flex-wrap:wrap;gap:10px}
pre{background:#f6f6f6;border:1px solid #ddd;padding:.6em;font-size:.8em;overflow:auto;max-height:40em}
.ok{color:#1a7f37}.fail{color:#b42318;font-weight:600}.muted{color:#777}
"""


# --- small PNG writer and thumbnails ----------------------------------------------------------


#: Thumbnail palette: grey levels 0..254, and entry :data:`NAN_INDEX` for pixels without data.
NAN_INDEX = 255
PALETTE = bytes(
    [v for i in range(NAN_INDEX) for v in (round(i * 255 / (NAN_INDEX - 1)),) * 3] + list(NAN_RGB)
)


def png_bytes(indices: np.ndarray, palette: bytes = PALETTE) -> bytes:
    """An 8-bit palette PNG of a (height, width) uint8 array of indices into ``palette`` (RGB
    triples), row 0 at the top: a third of the size of an RGB PNG, and faster to compress. A
    (height, width, 3) array is an RGB PNG (no palette)."""
    indices = np.ascontiguousarray(indices, dtype=np.uint8)
    height, width = indices.shape[:2]
    colour = indices.ndim == 3
    raw = np.zeros((height, 1 + width * (3 if colour else 1)), dtype=np.uint8)  # filter byte 0 per row
    raw[:, 1:] = indices.reshape(height, -1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2 if colour else 3, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + (b"" if colour else chunk(b"PLTE", palette))
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 1))  # level 1: fast, thumbnails are noisy anyway
        + chunk(b"IEND", b"")
    )


def block_mean(data: np.ndarray | RowSource, max_side: int = THUMB_MAX) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean of ``f`` x ``f`` blocks (NaN ignored; all-NaN blocks stay NaN), with the smallest
    factor ``f`` that makes the long side at most ``max_side``.  Partial edge blocks are kept.
    Returns the means, the number of finite pixels behind each, and ``f``.

    Sums are float32 (a thumbnail, not science). The frame is taken in strips of whole blocks
    (about :data:`STRIP_BYTES`), so a big frame is never copied whole; a strip without NaN and
    whose width is a multiple of ``f`` (the usual case) is not copied. ``data`` may be rows on
    disk (a :class:`~imgproc.stars.RowSource`), read a strip at a time.
    """
    ny, nx = data.shape
    read = row_reader(data)
    factor = max(1, math.ceil(max(ny, nx) / max_side))
    ty, tx = math.ceil(ny / factor), math.ceil(nx / factor)
    total, counts = np.empty((ty, tx), np.float32), np.empty((ty, tx), np.int64)
    step = factor * max(1, STRIP_BYTES // (4 * tx * factor * factor))
    padded = None  # made once, the first time a strip needs it: NaN beyond the last column
    for start in range(0, ny, step):
        strip = read(start, min(ny, start + step))
        shape = (math.ceil(len(strip) / factor) * factor, tx * factor)
        if strip.shape == shape:
            strip = np.asarray(strip, dtype=np.float32)
        else:  # copied (and converted, a file's rows being big-endian) into the padded strip
            if padded is None:
                padded = np.full((min(step, ty * factor), tx * factor), np.nan, dtype=np.float32)
            padded[: len(strip), :nx] = strip
            padded[len(strip) :] = np.nan
            strip = padded[: shape[0]]
        rows = slice(start // factor, start // factor + shape[0] // factor)
        total[rows] = block_sum(strip, factor, np.float32)
        if np.isfinite(total[rows]).all():  # no NaN or inf: every block is full
            counts[rows] = factor * factor
        else:
            finite = np.isfinite(strip)
            total[rows] = block_sum(np.where(finite, strip, np.float32(0.0)), factor, np.float32)
            counts[rows] = block_sum(finite, factor, np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(counts > 0, total / np.maximum(counts, 1).astype(np.float32), np.float32(np.nan))
    return out, counts, factor


def stretch(image: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Palette indices (:data:`PALETTE`) of ``image`` with a robust asinh stretch, NaN as
    :data:`NAN_INDEX`; also the (low, high) display range.

    Black is 2σ below the sky (median), white the 99.7th percentile (both from a regular sample
    of the finite pixels); in between the levels follow asinh((value - low) / 3σ), linear near
    the sky so its noise shows, logarithmic for stars.
    """
    sample = regular_sample(image)
    if sample.size == 0:
        return np.full(image.shape, NAN_INDEX, dtype=np.uint8), (0.0, 0.0)
    sky, noise = robust_background(sample)
    low = sky - 2.0 * noise if noise > 0 else float(np.percentile(sample, 0.5))
    high = float(np.percentile(sample, 99.7))
    if not high > low:
        high = float(np.nanmax(image))
    if not high > low:
        high = low + 1.0
    soft = 3.0 * noise if noise > 0 else (high - low) / 10
    top = NAN_INDEX - 1
    with np.errstate(invalid="ignore"):
        scaled = np.clip(image - np.float32(low), 0.0, high - low) / np.float32(soft)
        level = np.arcsinh(scaled) * np.float32(top / np.arcsinh((high - low) / soft))
    return np.round(np.nan_to_num(level, nan=NAN_INDEX)).astype(np.uint8), (low, high)


def open_output(path: Path) -> tuple[fits.HDUList, int]:
    """The output file opened memory-mapped, and the index of its image HDU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        hdul = fits.open(path, memmap=True)
    for index, hdu in enumerate(hdul):
        if hdu.is_image and hdu.header.get("NAXIS", 0) in (2, 3):  # 3: an RGB cube
            return hdul, index
    hdul.close()
    raise ValueError("no 2-D image or RGB cube")


def thumbnail_of(
    data: np.ndarray | Float32Rows, header: fits.Header, max_side: int = THUMB_MAX
) -> dict[str, Any]:
    """Thumbnail (PNG bytes and size, long side at most ``max_side``), header facts and star
    statistics of an image, or of a float32 image's rows on disk. An RGB cube (3, ny, nx) gives
    a colour thumbnail, each plane stretched alike from its own sky and noise (so the sky comes
    out neutral grey); its statistics are those of the green plane."""
    cube = data if isinstance(data, np.ndarray) and data.ndim == 3 else None
    if cube is not None:
        data = cube[1]
    small, counts, factor = block_mean(data, max_side)
    indices, (low, high) = stretch(small)
    if cube is not None:
        levels = np.stack([stretch(block_mean(plane, max_side)[0])[0] for plane in cube], axis=-1)
        rgb = np.round(levels.astype(np.float32) * (255.0 / (NAN_INDEX - 1))).astype(np.uint8)
        rgb[(levels == NAN_INDEX).any(axis=-1)] = NAN_RGB
        indices = rgb
    pixels = data.memmap() if isinstance(data, Float32Rows) else data  # stamps: a few pages of it
    stars, fwhm = thumbnail_stars(pixels, small, counts, factor)
    return {
        "png": png_bytes(indices[::-1]),  # FITS row 0 is the bottom of the image
        "width": small.shape[1],
        "height": small.shape[0],
        "factor": factor,
        "shape": data.shape,
        "range": (low, high),
        "stars": stars,
        "fwhm": fwhm,
        "nan_fraction": float(np.isnan(small).mean()),
        "header": {key: header.get(key) for key in ("NCOMBINE", "DATE-AVG", "OBJECT", "FILTER")},
    }


def thumbnail(path: Path, max_side: int = THUMB_MAX) -> dict[str, Any]:
    """:func:`thumbnail_of` the image in a FITS file: an imgproc float32 image read a strip of
    rows at a time (a memory map read through would hold every page of a 61-MP frame, 245 MB,
    in the process until it is closed), anything else memory-mapped."""
    try:
        rows = Float32Rows(path)
    except FitsError:  # an RGB cube, a linked raw frame
        hdul, index = open_output(path)
        with hdul:
            return thumbnail_of(hdul[index].data, hdul[index].header, max_side)
    return thumbnail_of(rows, rows.header, max_side)


def cached_thumbnail(
    path: Path,
    cache: Path,
    name: str | None = None,
    data: np.ndarray | None = None,
    header: fits.Header | None = None,
    max_side: int = THUMB_MAX,
) -> dict[str, Any]:
    """The thumbnail of the file at ``path``, kept in ``cache/<name>.json`` (``name`` defaults to
    the file's) while the file's size and modification time are unchanged.

    The jobs that write a file fill the cache from the ``data`` and ``header`` they hold, in
    parallel (a memory map of the file, as calibration gives for a 61-MP frame, is read from
    the file by strips instead); the report only reads it.
    """
    stat = path.stat()
    key = [stat.st_size, stat.st_mtime_ns]
    store = cache / f"{name or path.name}.json"
    entry = read_json(store)
    if not entry or entry.get("key") != key:
        if data is None or header is None or isinstance(data, np.memmap):
            thumb = thumbnail(path, max_side)
        else:
            thumb = thumbnail_of(data, header, max_side)
        entry = {"key": key, **thumb, "png": base64.b64encode(thumb["png"]).decode("ascii")}
        write_json(store, entry)
    return {**entry, "png": base64.b64decode(entry["png"])}


# --- SVG plots --------------------------------------------------------------------------------

#: Frames dated further than this from a night's median time (a clock at year 1 or 9999) are
#: left out of the plots, with a note: the axes span the night, not millennia.
PLOT_SPAN = timedelta(days=366)


def _nice_step(raw: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten that is at least ``raw`` (> 0)."""
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def nice_ticks(low: float, high: float, target: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    span = high - low
    if not span > 0:
        return [low]
    step = _nice_step(span / target)
    first = math.ceil(low / step - 1e-9) * step
    count = math.floor((high - first) / step + 1e-9) + 1
    return [round(first + i * step, 10) for i in range(count)]


def time_ticks(low: float, high: float, target: int = 8) -> list[float]:
    """Tick values (minutes) on round clock times covering [low, high]; beyond a day a tick, on
    whole days (1, 2, 5, 10, 20... of them), so that any span gives about ``target`` ticks."""
    steps = (0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720, 1440)
    rough = (high - low) / target
    step = next((s for s in steps if s >= rough), None) or 1440 * _nice_step(rough / 1440)
    first = math.ceil(low / step - 1e-9) * step
    count = math.floor((high - first) / step + 1e-9) + 1
    return [first + i * step for i in range(max(count, 0))]


def _fmt(value: float) -> str:
    return f"{value:.1f}"


def svg_plot(
    title: str,
    series: Sequence[tuple[str, Sequence[tuple[float, float, str, str]]]],
    origin: datetime,
    y_label: str,
    width: int = 520,
    height: int = 230,
) -> str:
    """A line plot as inline SVG.  ``series``: (label, [(minutes after origin, y, tooltip, group)]);
    the points of one group are joined by a line."""
    points = [p for _, pts in series for p in pts]
    left, right, top, bottom = 62, 12, 28, 40
    esc = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}" font-size="11" '
        'font-family="sans-serif">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff" stroke="#ccc"/>',
        f'<text x="{left}" y="18" font-size="13">{esc(title)}</text>',
    ]
    if not points:
        parts.append(f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle">no data</text>')
        return "".join(parts) + "</svg>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 - x0 < 1e-9:
        x0, x1 = x0 - 1, x1 + 1
    x_pad = (x1 - x0) * 0.03
    x0, x1 = x0 - x_pad, x1 + x_pad
    pad = (y1 - y0) * 0.08 if y1 > y0 else max(abs(y0) * 0.01, 0.5)
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * plot_h

    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>')
    for tick in nice_ticks(y0, y1):
        y = py(tick)
        parts.append(f'<line x1="{left}" y1="{_fmt(y)}" x2="{left + plot_w}" y2="{_fmt(y)}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 4}" y="{_fmt(y + 4)}" text-anchor="end">{tick:g}</text>')
    ticks = time_ticks(min(xs), max(xs))  # within the data: every label is a valid date
    days = len(ticks) > 1 and ticks[1] - ticks[0] >= 1440
    for tick in ticks:
        x = px(tick)
        clock = "%Y-%m-%d" if days else "%H:%M" if tick == round(tick) else "%H:%M:%S"
        label = (origin + timedelta(minutes=tick)).strftime(clock)
        parts.append(f'<line x1="{_fmt(x)}" y1="{top}" x2="{_fmt(x)}" y2="{top + plot_h}" stroke="#eee"/>')
        parts.append(f'<text x="{_fmt(x)}" y="{top + plot_h + 14}" text-anchor="middle">{label}</text>')
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle">time (UTC, mid-exposure)'
        "</text>"
    )
    parts.append(
        f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
        f"{esc(y_label)}</text>"
    )
    for index, (label, pts) in enumerate(series):
        colour = _SERIES_COLOURS[index % len(_SERIES_COLOURS)]
        ordered = sorted(pts)
        for group in sorted({p[3] for p in ordered}):  # a line per group (sequence), in time order
            line = [(x, y) for x, y, _, g in ordered if g == group]
            if len(line) > 1:
                path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in line)
                parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for x, y, tip, _ in ordered:
            parts.append(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"><title>{esc(tip)}</title>'
                "</circle>"
            )
        lx = width - right - (len(series) - index) * 60
        parts.append(f'<rect x="{lx}" y="9" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{lx + 14}" y="18">{esc(label)}</text>')
    return "".join(parts) + "</svg>"


# --- gathering the run's facts ----------------------------------------------------------------


def frame_rows(
    plan: Sequence[Mapping[str, Any]],
    manifest: Mapping[str, Mapping[str, Any]],
    calibrated: Mapping[str, Mapping[str, Any]],
    published: Mapping[str, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """One row per planned light: its header facts, statistics, shift, masters, output, status."""
    shifts: dict[str, dict] = {}
    excluded: dict[str, str] = {}
    quality: dict[str, dict] = {}
    for item in published.values():
        shifts.update(item.get("shifts") or {})
        excluded.update(item.get("excluded") or {})
        quality.update(item.get("quality") or {})
    rows = []
    for entry in plan:
        fid, path = str(entry["frame_id"]), str(entry["path"])
        raw = manifest.get(path, {})
        cal = calibrated.get(fid, {})
        output = entry.get("output") or ""
        out_item = published.get(output, {}) if output else {}
        if entry["status"] != OK:
            status, reason, level = "skipped", entry.get("reason") or "", "bad"
        elif cal.get("status") in ("skipped", "failed"):
            status, reason, level = cal["status"], cal.get("reason", ""), "bad"
        elif not cal:
            status, reason, level = "not calibrated", "no calibrate receipt for this frame", "warn"
        elif fid in excluded:
            status, reason, level = "excluded", excluded[fid], "bad"
        elif out_item.get("status") in ("skipped", "failed"):
            status, reason, level = f"output {out_item['status']}", out_item.get("reason", ""), "bad"
        elif not out_item:
            status, reason, level = cal["status"], "no publish receipt for its output", "warn"
        else:
            status, reason, level = f"{cal['status']}, {out_item['status']}", "", ""
        rows.append(
            {
                "frame_id": fid,
                "path": path,
                "name": Path(path).name,
                "object": raw.get("object"),
                "filter": raw.get("filter"),
                "exptime": raw.get("exptime"),
                "sequence": str(entry.get("sequence") or ""),
                "mid": entry.get("mid") or "",
                "sky": cal.get("sky"),
                "noise": cal.get("noise"),
                "shift": shifts.get(fid),
                "quality": quality.get(fid) or {},
                "reference": out_item.get("reference") in (fid, entry.get("measure") or fid),
                "masters": {role: entry.get(role) for role in ROLES if entry.get(role)},
                "output": output,
                "status": status,
                "reason": reason,
                "level": level,
            }
        )
    return rows


def master_usage(
    plan: Sequence[Mapping[str, Any]], manifest_rows: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Every master in the manifest (and any named in the plan) with the number of processed
    lights that used it. Frames of another type found in a master folder are not masters: the
    summary lists or skips them."""
    used = Counter((role, str(e[role])) for e in plan if e["status"] == OK for role in ROLES if e.get(role))
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for row in manifest_rows:
        if row["folder"] in ROLES and row["role"] == row["folder"]:
            rows[(row["folder"], str(row["path"]))] = {"role": row["folder"], "path": str(row["path"]), **row}
    for role, path in used:
        rows.setdefault((role, path), {"role": role, "path": path, "status": OK})
    result = [dict(info, lights=used.get(key, 0)) for key, info in rows.items()]
    return sorted(result, key=lambda r: (ROLES.index(r["role"]), -r["lights"], r["path"]))


def software_versions() -> list[tuple[str, str]]:
    """(name, version) of Python and the packages the run depends on."""
    versions = [("python", platform.python_version())]
    for name in _PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = __version__ if name == "imgproc" else "not installed"
        versions.append((name, version))
    return versions


# --- HTML ---------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    """HTML-escaped text of a value ('' for None)."""
    return "" if value is None else html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{float(value):.{digits}f}"


def _table(headers: Sequence[str], rows: Iterable[str], css_id: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f'<table id="{css_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None


def _with_thumbnail(plan: Sequence[Mapping[str, Any]]) -> set[str]:
    """Outputs the plan gave a thumbnail (an older plan without the column: all of them)."""
    return {row["output"] for row in plan if row.get("thumb") is not False}


def _sampling_note(plan: Sequence[Mapping[str, Any]], outputs: Sequence[str]) -> str:
    """What the gallery leaves out: most lone frames of a long night (see plan.REPORT_FRAMES)."""
    lone = {row["output"] for row in plan if row.get("pub_kind") == "link"} & set(outputs)
    shown = _with_thumbnail(plan) & lone
    if not lone or len(shown) == len(lone):
        return ""
    return (
        f'<p class="muted">Thumbnails of {len(shown)} of the {len(lone)} calibrated single frames, '
        "evenly spread over the night; the table below lists every light.</p>"
    )


def _thumbnails_html(outdir: Path, names: Sequence[str], published: Mapping[str, Mapping[str, Any]]) -> str:
    cards = []
    for name in names:
        item = published.get(name, {})
        path = outdir / name
        try:
            thumb = cached_thumbnail(path, outdir / "work" / "thumbs")
        except (OSError, ValueError, TypeError) as exc:
            cards.append(
                f'<div class="thumb"><div class="name">{_e(name)}</div>'
                f'<div class="fail">cannot show: {_e(exc)}</div></div>'
            )
            continue
        header = thumb["header"]
        ncombine = header["NCOMBINE"] if header["NCOMBINE"] is not None else item.get("ncombine", 1)
        uri = "data:image/png;base64," + base64.b64encode(thumb["png"]).decode("ascii")
        fwhm = f"{thumb['fwhm']:.2f} px" if thumb["fwhm"] is not None else "n/a"
        ny, nx = thumb["shape"]
        low, high = thumb["range"]
        zoom = max(1, THUMB_MAX // max(thumb["width"], thumb["height"]))  # small images shown larger
        nodata = f", {thumb['nan_fraction']:.1%} no data" if thumb["nan_fraction"] > 0 else ""
        cards.append(
            f'<div class="thumb" data-output="{_e(name)}">'
            f'<img src="{uri}" width="{thumb["width"] * zoom}" height="{thumb["height"] * zoom}" '
            f'alt="{_e(name)}">'
            f'<div class="name">{_e(name)}</div>'
            f"<div>NCOMBINE {_e(ncombine)} &middot; DATE-AVG {_e(header['DATE-AVG'])}</div>"
            f"<div>OBJECT {_e(header['OBJECT'])} &middot; FILTER {_e(header['FILTER'])}</div>"
            f"<div>{nx}&times;{ny} px, thumbnail 1:{thumb['factor']} &middot; "
            f"stars &gt;5&sigma; {thumb['stars']} &middot; FWHM {fwhm}</div>"
            f'<div class="muted">display {low:.1f} &ndash; {high:.1f} (asinh){nodata}</div>'
            "</div>"
        )
    if not cards:
        return "<p>No output was written.</p>"
    legend = (
        f'<p class="muted">Block-mean thumbnails, north/up as stored (FITS row 1 at the bottom); pixels '
        f'without data are shown in <span style="color:rgb{NAN_RGB}">&#9632;</span> blue.</p>'
    )
    return legend + f'<div class="thumbs">{"".join(cards)}</div>'


def _frames_html(rows: Sequence[Mapping[str, Any]]) -> str:
    headers = (
        "#", "Light", "Object", "Filter", "Exp (s)", "Mid-exposure (UTC)", "Sky", "Noise", "FWHM (px)",
        "Round", "Stars", "dx", "dy", "Rot (°)", "Quality", "Masters", "Output", "Status",
    )  # fmt: skip
    body = []
    for index, row in enumerate(rows, 1):
        shift = row["shift"] or {}
        masters = "<br>".join(
            f'{role}: <span title="{_e(path)}">{_e(Path(path).name)}</span>'
            for role, path in row["masters"].items()
        )
        measured = row.get("quality") or {}
        quality = _num(shift.get("quality"), 3) + (" flipped" if shift.get("flipped") else "")
        if shift.get("method") == "stars":
            quality += f" ({shift['stars']} stars, rms {shift['residual']:.3f} px)"
        elif shift.get("method"):
            quality += " (correlation)"
        if row.get("reference"):
            quality = f"<b>reference</b> {quality}"
        status = _e(row["status"]) + (f": {_e(row['reason'])}" if row["reason"] else "")
        cells = (
            ("num", str(index)),
            ("file", f'<span title="{_e(row["path"])}">{_e(row["name"])}</span>'),
            ("", _e(row["object"])),
            ("", _e(row["filter"])),
            ("num", _num(row["exptime"], 1)),
            ("nowrap", _e(row["mid"][:19].replace("T", " "))),
            ("num", _num(row["sky"])),
            ("num", _num(row["noise"])),
            ("num", _num(measured.get("fwhm"))),
            ("num", _num(measured.get("roundness"))),
            ("num", _num(measured.get("stars"), 0)),
            ("num", _num(shift.get("dx"), 3)),
            ("num", _num(shift.get("dy"), 3)),
            ("num", _num(shift.get("rotation"), 3)),
            ("num", quality),
            ("nowrap", masters),
            ("file", _e(row["output"])),
            ("", status),
        )
        tds = "".join(f'<td class="{css}">{text}</td>' if css else f"<td>{text}</td>" for css, text in cells)
        body.append(f'<tr class="{row["level"]}" data-frame="{_e(row["frame_id"])}">{tds}</tr>')
    if not body:
        return "<p>No light was planned.</p>"
    return _table(headers, body, "frames")


def _plots_html(rows: Sequence[Mapping[str, Any]]) -> str:
    timed = [(row, _parse_time(row["mid"])) for row in rows]
    timed = [(row, when) for row, when in timed if when is not None]
    if not timed:
        return "<p>No frame to plot.</p>"
    median = sorted(when for _, when in timed)[len(timed) // 2]
    far = [row["name"] for row, when in timed if abs(when - median) > PLOT_SPAN]
    timed = [(row, when) for row, when in timed if abs(when - median) <= PLOT_SPAN]
    note = (
        f'<p class="muted" id="not-plotted">{len(far)} frames dated more than {PLOT_SPAN.days} days from '
        f"the night's median time are not plotted: {_e(', '.join(sorted(far)))}</p>"
        if far
        else ""
    )
    origin = min(when for _, when in timed).replace(second=0, microsecond=0)
    by_filter: dict[str, list[tuple[Mapping[str, Any], float]]] = defaultdict(list)
    for row, when in timed:
        by_filter[str(row["filter"] or "?")].append((row, (when - origin).total_seconds() / 60))
    blocks = []
    for filt in sorted(by_filter):
        frames = by_filter[filt]
        dx = [
            (t, r["shift"]["dx"], f"{r['name']}: dx={r['shift']['dx']:+.3f}", r["sequence"])
            for r, t in frames
            if r["shift"]
        ]
        dy = [
            (t, r["shift"]["dy"], f"{r['name']}: dy={r['shift']['dy']:+.3f}", r["sequence"])
            for r, t in frames
            if r["shift"]
        ]
        sky = [
            (t, float(r["sky"]), f"{r['name']}: sky={r['sky']:.2f}", r["sequence"])
            for r, t in frames
            if r["sky"] is not None
        ]
        shift_plot = (
            svg_plot(f"Alignment shift, filter {filt}", [("dx", dx), ("dy", dy)], origin, "shift (px)")
            if dx
            else svg_plot(f"Alignment shift, filter {filt} (not aligned)", [], origin, "shift (px)")
        )
        sky_plot = svg_plot(f"Sky level, filter {filt}", [("sky", sky)], origin, "median (ADU)")
        measured = {
            key: [
                (t, float(r["quality"][key]), f"{r['name']}: {key}={r['quality'][key]}", r["sequence"])
                for r, t in frames
                if (r.get("quality") or {}).get(key) is not None
            ]
            for key in ("fwhm", "stars")
        }
        quality_plots = (
            svg_plot(f"Star FWHM, filter {filt}", [("FWHM", measured["fwhm"])], origin, "median (px)")
            + svg_plot(f"Stars detected, filter {filt}", [("stars", measured["stars"])], origin, "stars")
            if measured["fwhm"]
            else ""
        )
        blocks.append(
            f'<div class="plots" data-filter="{_e(filt)}">{shift_plot}{sky_plot}{quality_plots}</div>'
        )
    return note + "".join(blocks)


def _masters_html(masters: Sequence[Mapping[str, Any]], built: Iterable[str] = ()) -> str:
    body = []
    built_names = {Path(str(path)).name for path in built}
    for row in masters:
        status = row.get("status") or ""
        detail = f"{status}: {row['reason']}" if row.get("reason") else status
        if status == OK and not row["lights"]:
            detail = "not matched by any light"
        elif status == OK and Path(row["path"]).name in built_names:
            detail = "built by imgproc from raw frames"
        level = "bad" if status == "skipped" else ("warn" if not row["lights"] else "")
        body.append(
            f'<tr class="{level}"><td>{_e(row["role"])}</td><td title="{_e(row["path"])}">'
            f'{_e(Path(row["path"]).name)}</td><td class="num">{row["lights"]}</td>'
            f'<td>{_e(row.get("date_obs"))}</td><td class="num">{_num(row.get("exptime"), 1)}</td>'
            f'<td>{_e(row.get("filter"))}</td><td class="num">{_num(row.get("gain"), 1)}</td>'
            f"<td>{_e(row.get('instrume'))}</td><td>{_e(detail)}</td></tr>"
        )
    if not body:
        return "<p>No master frame was given.</p>"
    headers = (
        "Role", "Master file", "Lights using it", "DATE-OBS", "Exp (s)", "Filter", "Gain", "Instrument",
        "Status",
    )  # fmt: skip
    return _table(headers, body, "masters")


def _problems_html(summary: Mapping[str, Any]) -> str:
    failed = [{"file": n, "reason": r} for n, r in (summary.get("failed_outputs") or {}).items()]
    not_written = [{"file": n, "reason": r} for n, r in (summary.get("skipped_outputs") or {}).items()]
    not_built = [
        {
            "file": ", ".join(Path(str(f)).name for f in m.get("frames") or []),
            "reason": f"{m.get('role')}: {m.get('reason')}",
        }
        for m in summary.get("masters_not_built") or []
    ]
    sections = [
        ("failed-outputs", "Outputs failed (internal error; tracebacks in logs/publish)", failed),
        (
            "failed-frames",
            "Lights failed (internal error; tracebacks in logs/calibrate)",
            summary.get("failed_frames") or [],
        ),
        ("skipped", "Lights skipped", summary.get("skipped") or []),
        ("listed", "Files listed but not processed", summary.get("listed") or []),
        ("masters-skipped", "Masters not used", summary.get("masters_skipped") or []),
        ("skipped-outputs", "Outputs not written", not_written),
        ("masters-not-built", "Raw calibration frames not combined into a master", not_built),
    ]
    notes = calibration_notes(summary)
    out = [f'<ul id="calibration-notes">{"".join(f"<li>{_e(n)}</li>" for n in notes)}</ul>'] if notes else []
    for css_id, title, items in sections:
        if not items:
            continue
        body = [
            f'<tr><td title="{_e(i["file"])}">{_e(Path(str(i["file"])).name)}</td>'
            f"<td>{_e(i['reason'])}</td></tr>"
            for i in items
        ]
        out.append(f"<h3>{_e(title)} ({len(items)})</h3>" + _table(("File", "Reason"), body, css_id))
    return "".join(out) or '<p class="ok">Nothing was skipped or left out.</p>'


def config_text(outdir: Path, config: Mapping[str, Any] | None = None) -> str:
    """The configuration to show: ``imgproc.yaml`` as written (with its comments) when it is
    the configuration of the run, else ``config`` as YAML."""
    path = outdir / "imgproc.yaml"
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else None
    if config is None:
        return text if text is not None else "imgproc.yaml not found"
    if text is not None:
        try:
            if yaml.safe_load(text) == dict(config):
                return text
        except yaml.YAMLError:
            pass
    dumped = yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)
    return "# Configuration of the workflow run (imgproc.yaml is missing or differs)\n" + dumped


def build_report(
    outdir: Path, receipts: Sequence[Path] | None = None, config: Mapping[str, Any] | None = None
) -> str:
    """The HTML report of the run in ``outdir``.

    ``receipts`` are the batch receipts of the run (default: every one under ``work/``);
    ``config`` is the workflow's configuration (default: ``imgproc.yaml`` of the folder).
    """
    outdir = Path(outdir)
    work = outdir / "work"
    summary = read_json(outdir / "summary.json") or {}
    manifest_rows = read_tsv(work / "manifest.tsv") if (work / "manifest.tsv").exists() else []
    plan = read_tsv(work / "plan.tsv") if (work / "plan.tsv").exists() else []
    if receipts is None:
        receipts = sorted(work.glob("calibrated/*.json")) + sorted(work.glob("published/*.json"))
    paths = (Path(p) if Path(p).is_absolute() else outdir / p for p in receipts)
    calibrated, published = receipt_items(read_json(path) or {} for path in paths)
    manifest = {str(row["path"]): row for row in manifest_rows}
    rows = frame_rows(plan, manifest, calibrated, published)
    outputs = summary.get("output_files")
    if outputs is None:
        outputs = sorted(n for n, i in published.items() if i.get("status") not in ("skipped", "failed"))
    shown = _with_thumbnail(plan)
    complete = summary.get("complete")
    verdict = (
        '<span class="fail">FAILED: internal errors, see the failed outputs and lights below</span>'
        if summary.get("outputs_failed") or summary.get("failed_frames")
        else '<span class="ok">complete: every light was processed</span>'
        if complete
        else '<span class="fail">INCOMPLETE: see the skipped files below</span>'
    )
    script_hash = base64.b64encode(hashlib.sha256(_IMAGE_CHECK.encode()).digest()).decode()
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    versions = "".join(f"<tr><td>{_e(n)}</td><td>{_e(v)}</td></tr>" for n, v in software_versions())
    facts = (
        f"{_e(summary.get('lights', len(rows)))} lights, {len(outputs)} outputs written "
        f"({_e(summary.get('stacked', 0))} stacked), {len(summary.get('skipped') or [])} lights skipped, "
        f"{len(summary.get('listed') or [])} files listed but not processed."
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>imgproc report: {_e(outdir.resolve().name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>imgproc report: {_e(outdir.resolve().name)}</h1>",
        f"<p>{facts} {verdict}</p>",
        f'<h2 id="outputs">Outputs ({len(outputs)})</h2>',
        _sampling_note(plan, outputs),
        _thumbnails_html(outdir, [name for name in outputs if name in shown], published),
        f'<h2 id="lights">Lights ({len(rows)})</h2>',
        '<p class="muted">Sky and noise: median and 1.4826&times;MAD of the calibrated frame; FWHM, '
        "roundness (minor/major axis) and stars: measured while aligning (imgproc.stars); dx, dy, rot: "
        "shift of the frame's centre and rotation applied to reach the sequence's reference (marked "
        "<b>reference</b>: with alignment.reference best, the sharpest light the quality rules keep); "
        "quality: fraction of the stars matched (star registration) or normalised correlation peak.</p>",
        _frames_html(rows),
        '<h2 id="plots">Alignment, sky and frame quality against time</h2>',
        '<p class="muted">Per filter; lines join the frames of one sequence (OBJECT, filter, exposure, '
        "binning), whose shifts are measured against the same reference frame.</p>",
        _plots_html(rows),
        '<h2 id="master-usage">Master frames</h2>',
        _masters_html(master_usage(plan, manifest_rows), summary.get("masters_built") or ()),
        '<h2 id="problems">Skipped and listed files</h2>',
        _problems_html(summary),
        '<h2 id="config">Configuration</h2>',
        f'<pre id="config-text">{_e(config_text(outdir, config))}</pre>',
        '<h2 id="versions">Software</h2>',
        _table(("Package", "Version"), [versions], "versions"),
        f"<script>{_IMAGE_CHECK}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(
    outdir: Path,
    target: Path,
    receipts: Sequence[Path] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write :func:`build_report` of ``outdir`` to ``target`` (atomically); returns ``target``."""
    target = Path(target)
    text = build_report(outdir, receipts, config)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8", errors="backslashreplace")  # a non-UTF-8 file name
    os.replace(tmp, target)
    return target
