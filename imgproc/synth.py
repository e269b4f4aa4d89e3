"""Deterministic synthetic observing nights: raw lights plus master bias, dark and flat frames.

Used by the demo, the tests and the benchmark. Everything is whole-array numpy; files are
written with :mod:`astropy.io.fits`. The same :class:`NightSpec` always gives byte-identical
files: every random stream is derived from ``spec.seed`` and a fixed name, so e.g. turning
distractors on or off does not change the lights.

Physics of a light, in ADU (gain taken as 1 e-/ADU for the noise)::

    raw = bias + dark_rate_map * exptime + flat_norm * (sky + stars) + noise

``flat_norm`` is the master flat divided by its mean, so calibrating with the masters
(``(raw - bias - dark) / (flat / mean(flat))``) gives back ``sky + stars`` plus noise.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

__all__ = [
    "Night",
    "NightSpec",
    "make_night",
    "random_stars",
    "star_field",
    "write_fits",
]

_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))

# Fixed camera / site description (the lights and the matching masters share these).
_INSTRUME = "ZWO ASI294MM Pro"
_GAIN = 120
_OFFSET = 30
_READOUTM = "Normal"
_SET_TEMP = -10.0
_PIXSZ = 4.63  # micron
_FOCALLEN = 955.0  # mm -> 206.265 * 4.63 / 955 = 1.000 arcsec/px
_TELESCOP = "130mm f/7.3 APO"
_OBSERVER = "Test Observer"
_RA0, _DEC0 = 307.5, 40.5  # reference-frame centre (deg)

_FLAT_MEAN = 20000.0  # ADU, approximate level of the master flats
_FLAT_EXPTIME = 2.0
_N_BIAS, _N_DARK, _N_FLAT = 50, 20, 25  # frames "combined" into each master (sets master noise)

_STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "BZERO", "BSCALE"}


# --------------------------------------------------------------------------------------------
# Stars
# --------------------------------------------------------------------------------------------


def star_field(
    shape: tuple[int, int],
    stars: np.ndarray,
    *,
    fwhm: float = 2.5,
    shift: tuple[float, float] = (0.0, 0.0),
    rotate180: bool = False,
    rotation: float = 0.0,
) -> np.ndarray:
    """Render Gaussian stars into a float32 image.

    Parameters
    ----------
    shape
        ``(ny, nx)`` of the image.
    stars
        ``(n, 3)`` array of ``(y, x, flux)`` in reference-frame pixels (0-based, pixel centres
        at integers); ``flux`` is the total flux in ADU.
    fwhm
        Full width at half maximum in pixels.
    shift
        ``(dy, dx)``: the sky moves by this much, so a star at ``(y, x)`` lands at
        ``(y + dy, x + dx)``.
    rotate180
        Render the 180-degree rotated view (meridian flip): a star lands at
        ``(ny-1-(y+dy), nx-1-(x+dx))``.
    rotation
        Degrees (counter-clockwise with y up) the field turns about the image centre ``c``
        before ``shift``: a star lands at ``R (p - c) + c + shift`` (then rotated 180° with
        ``rotate180``); see :func:`field_positions`.

    Each star is rendered only in a ``±ceil(4 fwhm)`` cutout, normalised so that a star fully
    inside the image sums to ``flux``; all stars are accumulated in one ``np.bincount``.
    """
    ny, nx = int(shape[0]), int(shape[1])
    s = np.asarray(stars, dtype=np.float64).reshape(-1, 3)
    y, x = field_positions((ny, nx), s[:, :2], shift=shift, rotate180=rotate180, rotation=rotation).T
    r = max(1, math.ceil(4.0 * fwhm))
    off = np.arange(-r, r + 1)
    iy = np.floor(y + 0.5).astype(np.int64)
    ix = np.floor(x + 0.5).astype(np.int64)
    keep = (iy + r >= 0) & (iy - r < ny) & (ix + r >= 0) & (ix - r < nx)
    if not keep.any():
        return np.zeros((ny, nx), dtype=np.float32)
    y, x, iy, ix, flux = y[keep], x[keep], iy[keep], ix[keep], s[keep, 2]

    rows = iy[:, None] + off  # (n, m)
    cols = ix[:, None] + off
    sigma = fwhm * _FWHM_TO_SIGMA
    gy = np.exp(-0.5 * ((rows - y[:, None]) / sigma) ** 2)
    gx = np.exp(-0.5 * ((cols - x[:, None]) / sigma) ** 2)
    gy *= (flux / gy.sum(axis=1))[:, None]
    gx /= gx.sum(axis=1, keepdims=True)

    stamps = gy[:, :, None] * gx[:, None, :]  # (n, m, m)
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    index = rows[:, :, None] * nx + cols[:, None, :]
    img = np.bincount(index[inside], weights=stamps[inside], minlength=ny * nx)
    return img.reshape(ny, nx).astype(np.float32)


def field_positions(
    shape: tuple[int, int],
    yx: np.ndarray,
    *,
    shift: tuple[float, float] = (0.0, 0.0),
    rotate180: bool = False,
    rotation: float = 0.0,
) -> np.ndarray:
    """(n, 2) positions ``(y, x)`` where :func:`star_field` puts stars at reference ``yx``."""
    ny, nx = int(shape[0]), int(shape[1])
    yx = np.asarray(yx, dtype=np.float64).reshape(-1, 2)
    y, x = yx[:, 0].copy(), yx[:, 1].copy()
    if rotation:
        t = np.radians(rotation)
        cy, cx = (ny - 1) / 2.0, (nx - 1) / 2.0
        ry, rx = y - cy, x - cx
        y, x = cy + np.sin(t) * rx + np.cos(t) * ry, cx + np.cos(t) * rx - np.sin(t) * ry
    y = y + float(shift[0])
    x = x + float(shift[1])
    if rotate180:
        y = (ny - 1) - y
        x = (nx - 1) - x
    return np.column_stack([y, x])


def random_stars(
    shape: tuple[int, int],
    n: int,
    rng: np.random.Generator,
    *,
    flux_range: tuple[float, float] = (2e3, 2e5),
    margin: int = 0,
) -> np.ndarray:
    """Return an ``(n, 3)`` float64 array of ``(y, x, flux)``.

    Positions are uniform in ``[margin, ny-1-margin] x [margin, nx-1-margin]``; fluxes are
    log-uniform in ``flux_range``.
    """
    ny, nx = shape
    y = rng.uniform(margin, ny - 1 - margin, n)
    x = rng.uniform(margin, nx - 1 - margin, n)
    lo, hi = np.log(flux_range[0]), np.log(flux_range[1])
    flux = np.exp(rng.uniform(lo, hi, n))
    return np.column_stack([y, x, flux]).astype(np.float64)


# --------------------------------------------------------------------------------------------
# FITS writing
# --------------------------------------------------------------------------------------------


def write_fits(path: Path, data: np.ndarray, header: dict, *, dtype: str = "float32") -> None:
    """Write ``data`` as a single primary HDU (parent directories are created).

    ``dtype='uint16'`` stores BITPIX=16 with BZERO=32768 (values rounded and clipped to
    0..65535, NaN -> 0), like camera files; ``'float32'`` stores BITPIX=-32. Header cards come
    from ``header`` in insertion order; a value may be a ``(value, comment)`` tuple. Structural
    keywords (BITPIX, NAXIS*, BZERO, ...) in ``header`` are ignored.
    """
    arr = np.asarray(data)
    if dtype == "uint16":
        arr = np.clip(np.rint(np.nan_to_num(arr.astype(np.float64), nan=0.0)), 0, 65535)
        arr = arr.astype(np.uint16)
    elif dtype == "float32":
        arr = arr.astype(np.float32)
    else:
        raise ValueError(f"dtype must be 'uint16' or 'float32', got {dtype!r}")
    hdu = fits.PrimaryHDU(data=arr)
    for key, value in header.items():
        if key.upper() not in _STRUCTURAL:
            hdu.header[key] = value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hdu.writeto(path, overwrite=True)


# --------------------------------------------------------------------------------------------
# Night description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NightSpec:
    """Parameters of a synthetic night (every field has a default)."""

    n_lights: int = 12  # per filter
    shape: tuple[int, int] = (128, 128)  # (ny, nx)
    filters: tuple[str, ...] = ("V", "R")
    exptime: float = 60.0
    object_name: str = "V1234 Cyg"
    start: str = "2025-05-01T21:00:00"  # UTC, first light's DATE-OBS
    cadence_s: float = 75.0  # time between light starts
    dither_px: float = 3.0  # random sub-pixel dithers of up to this many px (0 = none)
    n_stars: int = 80
    sky: float = 300.0  # e-/ADU sky level before flat
    bias_level: float = 500.0
    dark_rate: float = 0.05  # ADU/s/pixel (with hot pixels)
    read_noise: float = 5.0
    distractors: bool = True  # non-matching and farther-in-time masters too
    dtype: str = "uint16"  # lights: "uint16" (BITPIX 16 + BZERO 32768) or "float32"
    seed: int = 0
    fwhm: float = 2.5  # star FWHM in pixels
    meridian_flip: bool = False  # second half of the lights: PIERSIDE='East', rotated 180°
    field_rotation: float = 0.0  # degrees the field turns from one light to the next (alt-az)


@dataclass
class Night:
    """What :func:`make_night` wrote, plus the ground truth."""

    root: Path
    lights: list[Path]  # in time order (== sorted by name)
    bias_dir: Path
    dark_dir: Path
    flat_dir: Path
    # light file name -> (dy, dx) true shift vs the first light of its filter
    shifts: dict[str, tuple[float, float]]
    # light file name -> {"bias": file name, "dark": file name, "flat": file name}
    expected_masters: dict[str, dict[str, str]]
    truth: dict[str, Any] = field(default_factory=dict)


_DEFAULT_SPEC = NightSpec()


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    """Independent generator for a named stream, stable across processes and spec changes."""
    words = [int(seed)]
    for k in keys:
        words.append(k if isinstance(k, int) else zlib.crc32(str(k).encode()))
    return np.random.default_rng(words)


def _iso(t: datetime) -> str:
    """'YYYY-MM-DDTHH:MM:SS.sss'."""
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def _camera_cards(
    binning: int = 1, gain: int = _GAIN, offset: int = _OFFSET, set_temp: float = _SET_TEMP
) -> dict[str, Any]:
    return {
        "XBINNING": binning,
        "YBINNING": binning,
        "GAIN": gain,
        "OFFSET": offset,
        "XPIXSZ": round(_PIXSZ * binning, 4),
        "YPIXSZ": round(_PIXSZ * binning, 4),
        "INSTRUME": _INSTRUME,
        "SET-TEMP": set_temp,
        "READOUTM": _READOUTM,
    }


def _master_header(
    imagetyp: str, date: datetime, exptime: float, ncombine: int, **camera: Any
) -> dict[str, Any]:
    hdr: dict[str, Any] = {"IMAGETYP": imagetyp, "EXPTIME": float(exptime), "DATE-OBS": _iso(date)}
    hdr.update(_camera_cards(**camera))
    hdr["CCD-TEMP"] = float(camera.get("set_temp", _SET_TEMP))
    hdr["NCOMBINE"] = ncombine
    return hdr


def _wcs_cards(
    shape: tuple[int, int], shift: tuple[float, float], rotate180: bool, rotation: float = 0.0
) -> dict[str, Any]:
    """Simple TAN WCS of a frame whose sky is turned by ``rotation`` degrees and moved by
    ``shift`` (and maybe rotated 180°), as :func:`star_field` renders it."""
    ny, nx = shape
    scale = round(206.265 * _PIXSZ / _FOCALLEN / 3600.0, 12)  # deg/px; short repr for FITS
    ref = WCS(naxis=2)
    ref.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    ref.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    ref.wcs.crval = [_RA0, _DEC0]
    ref.wcs.cd = [[-scale, 0.0], [0.0, scale]]
    # The frame centre shows the reference-frame pixel centre - R^-1 shift (also when rotated
    # 180°); the CD matrix is the reference's times R^-1 (x, y order), negated by a 180° turn.
    cy, cx = (ny - 1) / 2.0, (nx - 1) / 2.0
    t = math.radians(rotation)
    back = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])  # R^-1 in (x, y)
    bx, by = back @ np.array([shift[1], shift[0]])
    ra, dec = ref.wcs_pix2world([[cx - bx, cy - by]], 0)[0]
    sign = -1.0 if rotate180 else 1.0
    cd = sign * np.array([[-scale, 0.0], [0.0, scale]]) @ back if rotation else None
    return {
        "CTYPE1": "RA---TAN",
        "CTYPE2": "DEC--TAN",
        "CRPIX1": (nx + 1) / 2.0,
        "CRPIX2": (ny + 1) / 2.0,
        "CRVAL1": round(float(ra), 8),
        "CRVAL2": round(float(dec), 8),
        "CUNIT1": "deg",
        "CUNIT2": "deg",
        "CD1_1": sign * -scale if cd is None else float(cd[0, 0]),
        "CD1_2": 0.0 if cd is None else float(cd[0, 1]),
        "CD2_1": 0.0 if cd is None else float(cd[1, 0]),
        "CD2_2": sign * scale if cd is None else float(cd[1, 1]),
        "EQUINOX": 2000.0,
        "RADESYS": "ICRS",
    }


# --------------------------------------------------------------------------------------------
# Calibration structure (true frames)
# --------------------------------------------------------------------------------------------


def _bias_frame(shape: tuple[int, int], level: float, rng: np.random.Generator) -> np.ndarray:
    """Noise-free bias: level + smooth column pattern (a few ADU) + faint row gradient."""
    ny, nx = shape
    xs = np.arange(nx) / max(nx - 1, 1)
    ys = np.arange(ny) / max(ny - 1, 1)
    phase, period = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.4)
    cols = 2.0 * np.sin(2 * np.pi * xs / period + phase) + 1.5 * xs
    rows = 0.5 * ys
    return (level + cols[None, :] + rows[:, None]).astype(np.float32)


def _dark_rate_map(
    shape: tuple[int, int], rate: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Dark current in ADU/s per pixel (10% pixel scatter) and the (k, 2) hot-pixel list."""
    ny, nx = shape
    dmap = rate * np.clip(1.0 + 0.1 * rng.standard_normal(shape), 0.0, None)
    n_hot = max(3, round(5e-4 * ny * nx))
    flat_idx = rng.choice(ny * nx, size=n_hot, replace=False)
    hot_rate = np.exp(rng.uniform(np.log(0.5), np.log(20.0), n_hot))
    dmap.ravel()[flat_idx] += hot_rate
    hot = np.column_stack(np.unravel_index(np.sort(flat_idx), shape)).astype(np.int64)
    return dmap, hot


def _vignetting(shape: tuple[int, int], strength: float) -> np.ndarray:
    """1 at the centre falling to ``1 - strength`` in the corners."""
    ny, nx = shape
    yy = (np.arange(ny) - (ny - 1) / 2.0) / ((ny - 1) / 2.0 or 1.0)
    xx = (np.arange(nx) - (nx - 1) / 2.0) / ((nx - 1) / 2.0 or 1.0)
    r2 = (yy[:, None] ** 2 + xx[None, :] ** 2) / 2.0  # 1 in the corners
    return 1.0 - strength * r2


def _add_donuts(img: np.ndarray, rng: np.random.Generator, n: int) -> list[dict[str, float]]:
    """Multiply ``img`` in place by ``n`` dust donuts (soft annuli, 2-6% deep)."""
    ny, nx = img.shape
    size = min(ny, nx)
    donuts = []
    for _ in range(n):
        r_out = rng.uniform(0.03, 0.06) * size + 2.0
        r_in = 0.45 * r_out
        depth = rng.uniform(0.02, 0.06)
        cy, cx = rng.uniform(0, ny - 1), rng.uniform(0, nx - 1)
        w = max(0.5, 0.1 * r_out)
        h = math.ceil(r_out + 4 * w)
        y0, y1 = max(0, math.floor(cy) - h), min(ny, math.floor(cy) + h + 1)
        x0, x1 = max(0, math.floor(cx) - h), min(nx, math.floor(cx) + h + 1)
        yy = np.arange(y0, y1)[:, None] - cy
        xx = np.arange(x0, x1)[None, :] - cx
        rr = np.hypot(yy, xx)
        ring = 0.25 * (1 + np.tanh((rr - r_in) / w)) * (1 + np.tanh((r_out - rr) / w))
        img[y0:y1, x0:x1] *= 1.0 - depth * ring
        donuts.append({"y": cy, "x": cx, "r_in": r_in, "r_out": r_out, "depth": depth})
    return donuts


def _flat_frames(
    shape: tuple[int, int], filters: list[str], seed: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Noise-free flats normalised to mean 1 (sensor dust + PRNU shared, one donut per filter)."""
    base_rng = _rng(seed, "flat-sensor")
    prnu = 1.0 + 0.005 * base_rng.standard_normal(shape)
    sensor = np.ones(shape)
    sensor_donuts = _add_donuts(sensor, base_rng, 3)
    flats, info = {}, {"sensor_donuts": sensor_donuts, "filter_donuts": {}, "vignetting": {}}
    for f in filters:
        rng = _rng(seed, "flat-filter", f)
        strength = rng.uniform(0.18, 0.22)
        img = _vignetting(shape, strength) * sensor * prnu
        info["filter_donuts"][f] = _add_donuts(img, rng, 1)
        info["vignetting"][f] = strength
        flats[f] = (img / img.mean()).astype(np.float32)
    return flats, info


# --------------------------------------------------------------------------------------------
# The night
# --------------------------------------------------------------------------------------------


def make_night(root: Path, spec: NightSpec = _DEFAULT_SPEC) -> Night:
    """Write a synthetic night under ``root`` and return its description and ground truth.

    Layout: ``root/lights/*.fits`` (raw, ``spec.dtype``), and finished float32 masters in
    ``root/bias/``, ``root/darks/`` and ``root/flats/``. Lights interleave the filters in
    time (V, R, V, R, ...), one every ``cadence_s`` seconds from ``spec.start``, and are named
    ``<object>_<YYYY-MM-DD_HH-MM-SS>_<filter>_<exptime>s_<nnnn>.fits`` (``nnnn`` is the global
    frame number), so sorting by name is time order.

    The correct masters are ``bias_g120.fits``, ``dark_<exptime>s.fits`` and
    ``flat_<filter>.fits``. Distractor masters (``spec.distractors``) are, except the old
    dark, *nearer* in time to the lights than the correct ones, so a selector that ignores a
    criterion picks the wrong file.
    """
    root = Path(root)
    shape = (int(spec.shape[0]), int(spec.shape[1]))
    filters = list(spec.filters)
    if not filters:
        raise ValueError("NightSpec.filters must not be empty")
    if len(set(filters)) != len(filters):
        raise ValueError(f"NightSpec.filters has duplicates: {filters}")
    start = datetime.fromisoformat(spec.start)
    light_dir, bias_dir = root / "lights", root / "bias"
    dark_dir, flat_dir = root / "darks", root / "flats"
    for d in (light_dir, bias_dir, dark_dir, flat_dir):
        d.mkdir(parents=True, exist_ok=True)

    # --- truth: stars and the calibration structure ------------------------------------------
    margin = math.ceil(spec.dither_px) + 2 if min(shape) > 4 * (spec.dither_px + 2) else 0
    stars = random_stars(shape, spec.n_stars, _rng(spec.seed, "stars"), margin=margin)
    bias = _bias_frame(shape, spec.bias_level, _rng(spec.seed, "bias"))
    dark_rate, hot = _dark_rate_map(shape, spec.dark_rate, _rng(spec.seed, "dark"))
    dark = (dark_rate * spec.exptime).astype(np.float32)
    flats, flat_info = _flat_frames(shape, filters, spec.seed)

    # --- masters --------------------------------------------------------------------------
    writer = _MasterWriter(spec, start, bias_dir, dark_dir, flat_dir, bias, dark_rate, flats)
    bias_name, dark_name, flat_names = writer.correct()
    if spec.distractors:
        writer.distractors()

    # --- lights ---------------------------------------------------------------------------
    n_total = spec.n_lights * len(filters)
    dither = _rng(spec.seed, "dither").uniform(-spec.dither_px, spec.dither_px, (n_total, 2))
    obj = _slug(spec.object_name)
    lights: list[Path] = []
    shifts: dict[str, tuple[float, float]] = {}
    expected: dict[str, dict[str, str]] = {}
    offsets: dict[str, tuple[float, float]] = {}
    rotated: dict[str, bool] = {}
    rotation_of: dict[str, float] = {}
    filter_of: dict[str, str] = {}
    date_obs: dict[str, str] = {}
    first_of: dict[str, np.ndarray] = {}
    for k in range(n_total):
        f = filters[k % len(filters)]
        t = start + timedelta(seconds=k * spec.cadence_s)
        flip = spec.meridian_flip and k >= n_total // 2
        off = dither[k]
        first = first_of.setdefault(f, off)
        name = f"{obj}_{t:%Y-%m-%d_%H-%M-%S}_{_slug(f)}_{spec.exptime:.2f}s_{k:04d}.fits"
        rng = _rng(spec.seed, "light", k)

        turn = spec.field_rotation * k
        sky_stars = spec.sky + star_field(
            shape, stars, fwhm=spec.fwhm, shift=(float(off[0]), float(off[1])), rotate180=flip, rotation=turn
        )
        signal = dark + flats[f] * sky_stars
        sigma = np.sqrt(spec.read_noise**2 + np.clip(signal, 0.0, None))
        raw = bias + signal + sigma * rng.standard_normal(shape)

        hdr: dict[str, Any] = {
            "IMAGETYP": "LIGHT",
            "EXPTIME": float(spec.exptime),
            "DATE-OBS": _iso(t),
            **_camera_cards(),
            "CCD-TEMP": round(float(_SET_TEMP + rng.normal(0.0, 0.1)), 1),
            "TELESCOP": _TELESCOP,
            "FOCALLEN": _FOCALLEN,
            "FILTER": f,
            "OBJECT": spec.object_name,
            "RA": _RA0,
            "DEC": _DEC0,
            "PIERSIDE": "East" if flip else "West",
            "OBSERVER": _OBSERVER,
            **_wcs_cards(shape, (float(off[0]), float(off[1])), flip, turn),
        }
        path = light_dir / name
        write_fits(path, raw, hdr, dtype=spec.dtype)
        lights.append(path)
        shifts[name] = (float(off[0] - first[0]), float(off[1] - first[1]))
        offsets[name] = (float(off[0]), float(off[1]))
        rotated[name] = flip
        rotation_of[name] = turn
        filter_of[name] = f
        date_obs[name] = hdr["DATE-OBS"]
        expected[name] = {"bias": bias_name, "dark": dark_name, "flat": flat_names[f]}

    truth: dict[str, Any] = {
        "spec": spec,
        "stars": stars,  # (n, 3) y, x, flux in the reference frame (offset (0, 0))
        "offsets": offsets,  # light -> (dy, dx) applied to `stars` (star_field's `shift`)
        "rotate180": rotated,  # light -> rendered with rotate180 (after the meridian flip)
        "rotation": rotation_of,  # light -> degrees the field turned (star_field's `rotation`)
        "filter": filter_of,
        "date_obs": date_obs,
        "bias": bias,  # noise-free bias frame (ADU)
        "dark": dark,  # noise-free bias-subtracted dark at spec.exptime (ADU)
        "dark_rate": dark_rate.astype(np.float32),  # ADU/s per pixel
        "hot_pixels": hot,  # (k, 2) y, x
        "flat": flats,  # filter -> noise-free flat normalised to mean 1
        "flat_level": writer.flat_level,  # filter -> mean ADU of its master flat
        "flat_info": flat_info,  # vignetting strength and dust donuts
        "masters": writer.masters,  # master file name -> dir, role, reason, DATE-OBS
    }
    return Night(
        root=root,
        lights=lights,
        bias_dir=bias_dir,
        dark_dir=dark_dir,
        flat_dir=flat_dir,
        shifts=shifts,
        expected_masters=expected,
        truth=truth,
    )


class _MasterWriter:
    """Writes the correct and the distractor masters and records what each one is."""

    def __init__(
        self,
        spec: NightSpec,
        start: datetime,
        bias_dir: Path,
        dark_dir: Path,
        flat_dir: Path,
        bias: np.ndarray,
        dark_rate: np.ndarray,
        flats: dict[str, np.ndarray],
    ) -> None:
        self.spec, self.start = spec, start
        self.bias_dir, self.dark_dir, self.flat_dir = bias_dir, dark_dir, flat_dir
        self.bias, self.dark_rate, self.flats = bias, dark_rate, flats
        self.rn = spec.read_noise
        self.flat_level = {
            f: _FLAT_MEAN * _rng(spec.seed, "flat-level", f).uniform(0.9, 1.1) for f in spec.filters
        }
        self.masters: dict[str, dict[str, Any]] = {}

    # -- helpers ---------------------------------------------------------------------------
    def _before(self, **kw: float) -> datetime:
        return self.start - timedelta(**kw)

    def _write(self, path: Path, data: np.ndarray, hdr: dict[str, Any], role: str, reason: str) -> str:
        write_fits(path, data, hdr, dtype="float32")
        self.masters[path.name] = {
            "dir": path.parent.name,
            "role": role,
            "reason": reason,
            "date_obs": hdr["DATE-OBS"],
        }
        return path.name

    def _noisy(self, frame: np.ndarray, sigma: np.ndarray | float, key: str) -> np.ndarray:
        rng = _rng(self.spec.seed, "master-noise", key)
        return (frame + sigma * rng.standard_normal(frame.shape)).astype(np.float32)

    def _bias(
        self, name: str, when: datetime, role: str, reason: str, frame: np.ndarray, **camera: Any
    ) -> str:
        data = self._noisy(frame, self.rn / math.sqrt(_N_BIAS), name)
        hdr = _master_header("Master Bias", when, 0.0, _N_BIAS, **camera)
        return self._write(self.bias_dir / name, data, hdr, role, reason)

    def _dark(self, name: str, when: datetime, exptime: float, role: str, reason: str) -> str:
        signal = self.dark_rate * exptime
        # bias-subtracted: noise of the dark frames and of the subtracted bias
        sigma = np.sqrt(2 * self.rn**2 + signal) / math.sqrt(_N_DARK)
        hdr = _master_header("Master Dark", when, exptime, _N_DARK)
        return self._write(self.dark_dir / name, self._noisy(signal, sigma, name), hdr, role, reason)

    def _flat(
        self,
        name: str,
        when: datetime,
        filt: str,
        flat: np.ndarray,
        level: float,
        role: str,
        reason: str,
        **camera: Any,
    ) -> str:
        signal = flat * level
        sigma = np.sqrt(self.rn**2 + signal) / math.sqrt(_N_FLAT)
        hdr = _master_header("Master Flat", when, _FLAT_EXPTIME, _N_FLAT, **camera)
        hdr["FILTER"] = filt
        return self._write(self.flat_dir / name, self._noisy(signal, sigma, name), hdr, role, reason)

    # -- the sets --------------------------------------------------------------------------
    def correct(self) -> tuple[str, str, dict[str, str]]:
        """Write the masters the pipeline must choose; return their file names."""
        bias = self._bias(f"bias_g{_GAIN}.fits", self._before(hours=3), "correct", "matching bias", self.bias)
        exptime = self.spec.exptime
        dark = self._dark(
            f"dark_{exptime:g}s.fits",
            self._before(hours=2, minutes=30),
            exptime,
            "correct",
            "matching dark, nearest in time",
        )
        flats = {}
        for i, f in enumerate(self.spec.filters):
            flats[f] = self._flat(
                f"flat_{_slug(f)}.fits",
                self._before(minutes=60 - 2 * i),
                f,
                self.flats[f],
                self.flat_level[f],
                "correct",
                f"flat for filter {f}",
            )
        return bias, dark, flats

    def distractors(self) -> None:
        """Masters that must not be chosen. All but the old dark are nearer in time than the
        correct master of their kind, so ignoring a criterion picks the wrong file."""
        ny, nx = self.bias.shape
        before = self._before
        self._bias("bias_g0.fits", before(minutes=20), "distractor", "GAIN=0", self.bias - 20.0, gain=0)
        self._bias(
            "bias_g120_m20C.fits",
            before(minutes=25),
            "distractor",
            "SET-TEMP=-20",
            self.bias - 1.0,
            set_temp=-20.0,
        )
        self._bias(
            "bias_g120_bin2.fits",
            before(minutes=30),
            "distractor",
            "2x2 binning, half shape",
            self.bias[: ny // 2 * 2 : 2, : nx // 2 * 2 : 2],
            binning=2,
        )

        exptime = self.spec.exptime
        other = 120.0 if exptime != 120.0 else 300.0
        self._dark(f"dark_{other:g}s.fits", before(minutes=15), other, "distractor", f"EXPTIME={other:g}")
        self._dark(
            f"dark_{exptime:g}s_old.fits",
            before(days=10, hours=2, minutes=30),
            exptime,
            "distractor",
            "matching but 10 days older than the correct dark",
        )

        f0 = self.spec.filters[0]
        self._flat(
            f"flat_{_slug(f0)}_o10.fits",
            before(minutes=10),
            f0,
            self.flats[f0],
            self.flat_level[f0] * 0.98,
            "distractor",
            f"filter {f0} but OFFSET=10",
            offset=10,
        )
        unused = next(f for f in ("B", "U", "I", "Ha", "OIII", "SII", "L", "Z") if f not in self.spec.filters)
        self._flat(
            f"flat_{unused}.fits",
            before(minutes=5),
            unused,
            self.flats[f0],
            self.flat_level[f0] * 1.05,
            "distractor",
            f"filter {unused}: no such lights",
        )


# --------------------------------------------------------------------------------------------
# Colour (one-shot-colour, Bayer) nights
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColourSpec:
    """A colour camera's night: a known RGB sky seen through a Bayer mosaic.

    The pattern is written as the camera reads it (from its readout's first row and column):
    ``BAYERPAT`` starting at (``xoff``, ``yoff``) (XBAYROFF/YBAYROFF, written when not 0), the
    rows stored top-down (``ROWORDER = 'TOP-DOWN'`` when ``roworder`` says so) or bottom-up;
    ``in_filter`` writes it as a DSLR program does, as FILTER, without BAYERPAT.
    """

    pattern: str = "RGGB"
    xoff: int = 0
    yoff: int = 0
    roworder: str | None = None  # None (no card), "TOP-DOWN" or "BOTTOM-UP"
    in_filter: bool = False
    shape: tuple[int, int] = (90, 124)  # (ny, nx), stored
    n_lights: int = 3
    shifts: tuple[tuple[float, float], ...] = ()  # (dy, dx) of the sky in each light, mosaic pixels
    flipped: tuple[bool, ...] = ()  # lights after a meridian flip: sky rotated 180°, PIERSIDE='WEST'
    rotations: tuple[float, ...] = ()  # degrees the sky turns about the centre, before the shift
    sky: tuple[float, float, float] = (300.0, 500.0, 200.0)  # R, G, B sky levels
    noise: float = 3.0
    flat_colour: tuple[float, float, float] = (0.6, 1.0, 0.4)  # the flat lamp's R, G, B levels
    seed: int = 0


def colour_map(spec: ColourSpec) -> np.ndarray:
    """The colour letter of each stored pixel, built as the camera reads its rows (top first)
    and then stored."""
    ny, nx = spec.shape
    rows = (np.arange(ny)[:, None] + spec.yoff) % 2
    cols = (np.arange(nx)[None, :] + spec.xoff) % 2
    letters = np.array(list(spec.pattern)).reshape(2, 2)[rows, cols]  # readout order
    bottom_up = spec.roworder == "BOTTOM-UP" or (spec.in_filter and spec.roworder is None)
    return letters[::-1] if bottom_up else letters


def make_colour_night(root: Path, spec: ColourSpec = ColourSpec()) -> dict[str, Any]:
    """Write the lights of a colour night (``root/lights``, uint16) and a colour flat
    (``root/flats``); returns the truth: ``sky`` (light name -> the (3, ny, nx) RGB sky at every
    stored pixel, of which each pixel sees its own colour, before the pixels' ``response``, which
    the flat has too), ``colours`` (:func:`colour_map`) and ``lights``."""
    rng = _rng(spec.seed, "colour", spec.pattern)
    colours = colour_map(spec)
    stars = random_stars(spec.shape, 30, rng, flux_range=(1e4, 1e5), margin=12)
    tints = rng.uniform(0.5, 1.5, (3, len(stars)))
    response = _vignetting(spec.shape, 0.2) * rng.uniform(0.97, 1.03, spec.shape)
    cards: dict[str, Any] = {
        "INSTRUME": "SynthCam OSC",
        "FILTER": spec.pattern if spec.in_filter else "IRCUT",
    }
    if not spec.in_filter:
        cards["BAYERPAT"] = spec.pattern
    cards |= {key: value for key, value in (("XBAYROFF", spec.xoff), ("YBAYROFF", spec.yoff)) if value}
    if spec.roworder:
        cards["ROWORDER"] = spec.roworder
    start = datetime(2025, 9, 1, 22, 0, 0)
    truth: dict[str, Any] = {"sky": {}, "colours": colours, "lights": [], "response": response}
    for index in range(spec.n_lights):
        dy, dx = spec.shifts[index] if index < len(spec.shifts) else (0.0, 0.0)
        flipped = index < len(spec.flipped) and spec.flipped[index]
        turn = spec.rotations[index] if index < len(spec.rotations) else 0.0
        sky = np.stack([
            star_field(spec.shape, np.column_stack([stars[:, :2], stars[:, 2] * tint]), fwhm=4.0,
                       shift=(dy, dx), rotate180=flipped, rotation=turn) + level
            for tint, level in zip(tints, spec.sky, strict=True)
        ])  # fmt: skip
        mosaic = np.select([colours == c for c in "RGB"], list(sky)) * response
        light = mosaic + rng.normal(0.0, spec.noise, spec.shape)
        name = f"colour_{index:03d}.fits"
        when = start + timedelta(seconds=60 * index)
        header = cards | {
            "IMAGETYP": "Light Frame",
            "OBJECT": "M 57",
            "EXPTIME": 30.0,
            "DATE-OBS": _iso(when),
            "PIERSIDE": "WEST" if flipped else "EAST",
        }
        write_fits(root / "lights" / name, light, header, dtype="uint16")
        truth["sky"][name] = sky
        truth["lights"].append(root / "lights" / name)
    lamp = np.select([colours == c for c in "RGB"], [np.float32(v) * 20000 for v in spec.flat_colour])
    flat_cards = cards | {"IMAGETYP": "Master Flat", "EXPTIME": 1.0, "DATE-OBS": _iso(start)}
    write_fits(root / "flats" / "master_flat.fits", lamp * response, flat_cards, dtype="float32")
    return truth
