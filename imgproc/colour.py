"""One-shot-colour (Bayer) frames: CFA geometry, flat normalisation per colour, channel frames
(super-pixels), bilinear debayering, and the header cards saying what was done.

A colour camera's frame is a mosaic: each pixel sees one colour through a 2×2 colour filter array
(CFA). Throughout imgproc a pattern is given *as stored*: its four letters are the colours of
stored pixels (row 0, col 0), (0, 1), (1, 0), (1, 1), FITS row 0 first.
:func:`imgproc.keywords.stored_pattern`
turns a header's pattern, offsets and row order into that form.

Output modes (config ``colour.output``):

``channels``
    three frames per light, ``TR``, ``TG``, ``TB`` (AAVSO's filter codes for the red, green and
    blue channels of a colour camera), each pixel a CFA cell: its red site, the mean of its two
    green sites, its blue site (a *super-pixel*). No value is interpolated, so the photometry of
    each channel is that of its own sites.
``green``
    only the ``TG`` frame.
``rgb``
    one RGB cube per light (NAXIS3 = 3, planes R, G, B) at the mosaic's full resolution, debayered
    by bilinear interpolation (:func:`debayer_bilinear`).
``mosaic``
    the calibrated mosaic itself: never binned nor resampled.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from astropy.io import fits

from imgproc.align import Shift
from imgproc.binning import bin_header, bin_image
from imgproc.fitsio import FitsError, read_image, replaced_atomically
from imgproc.keywords import CHANNEL_FILTERS

#: Header cards that describe a mosaic; removed from frames that are no longer one.
MOSAIC_CARDS = ("BAYERPAT", "CFA-PAT", "COLORTYP", "XBAYROFF", "YBAYROFF")
#: Bilinear interpolation weights: with the missing sites at weight 0 and normalised by the sum
#: of the weights present, a site gets the mean of its same-colour neighbours (4 or 2 at distance
#: 1, or 4 diagonal ones).
_BILINEAR = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=np.float32)


def sites(pattern: str, colour: str) -> list[tuple[int, int]]:
    """(row, col) within the 2×2 cell of each site of ``colour`` (``R``, ``G`` or ``B``)."""
    return [(index // 2, index % 2) for index, letter in enumerate(pattern) if letter == colour]


def colour_mask(shape: tuple[int, int], pattern: str, colour: str) -> np.ndarray:
    """Boolean mask of the pixels of ``colour`` in a mosaic of ``shape``."""
    mask = np.zeros(shape, bool)
    for dy, dx in sites(pattern, colour):
        mask[dy::2, dx::2] = True
    return mask


def normalise_colour_flat(flat: np.ndarray, pattern: str) -> np.ndarray:
    """A colour flat divided, colour by colour, by the mean of that colour's usable sites (the
    two green sites together); pixels ≤ 0 or non-finite become NaN.

    Each colour's mean is then 1, so flat-fielding corrects pixel-to-pixel response and
    vignetting but keeps the light's colour balance (a flat lamp or twilight sky is not white).
    """
    out = np.where(np.isfinite(flat) & (flat > 0), flat, np.nan).astype(np.float32)
    for colour in "RGB":
        mask = colour_mask(out.shape, pattern, colour)
        values = out[mask]
        if not np.isfinite(values).any():
            raise ValueError(f"flat has no positive finite {colour} pixel")
        out[mask] = values / np.float32(np.nanmean(values, dtype=np.float64))
    return out


def superpixel(mosaic: np.ndarray, pattern: str, colour: str) -> np.ndarray:
    """The ``colour`` channel of a mosaic on its 2×2 cells (half the size; an odd last row or
    column dropped): the cell's site of that colour, the mean of the two for green."""
    ny, nx = mosaic.shape[0] // 2 * 2, mosaic.shape[1] // 2 * 2
    planes = [mosaic[dy:ny:2, dx:nx:2] for dy, dx in sites(pattern, colour)]
    if len(planes) == 1:
        return planes[0].astype(np.float32)
    return ((planes[0].astype(np.float64) + planes[1]) / 2.0).astype(np.float32)


def debayer_bilinear(mosaic: np.ndarray, pattern: str) -> np.ndarray:
    """An RGB cube (3, ny, nx) from a mosaic by bilinear interpolation: each pixel keeps its own
    colour's value; the other two are the means of the nearest sites of that colour (normalised
    convolution with the weights :data:`_BILINEAR`, so that frame edges and NaN pixels, which
    weigh 0, need no special case; a NaN stays NaN in its own colour only).

    Bilinear is the plainest documented demosaicing (e.g. Malvar, He & Cutler 2004, as baseline):
    it invents no detail and keeps each colour's flux. OpenCV's demosaicing takes only 8- and
    16-bit integers (calibrated frames are float with negative and NaN pixels), and
    colour-demosaicing needs the whole colour-science package; this is two scipy correlations
    per colour on whole arrays.
    """
    from scipy import ndimage

    cube = np.empty((3, *mosaic.shape), np.float32)
    finite = np.isfinite(mosaic)
    for plane, colour in enumerate("RGB"):
        mask = colour_mask(mosaic.shape, pattern, colour)
        weight = (mask & finite).astype(np.float32)
        values = np.where(mask & finite, mosaic, 0.0).astype(np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            interpolated = ndimage.correlate(values, _BILINEAR, mode="constant") / ndimage.correlate(
                weight, _BILINEAR, mode="constant"
            )
        cube[plane] = np.where(mask, mosaic, interpolated)
    return cube


def colour_image(
    mosaic: np.ndarray, header: fits.Header, pattern: str, channel: str, binning: int
) -> tuple[np.ndarray, fits.Header]:
    """The output of a calibrated mosaic (``header`` its calibrated header) for ``channel``: ``R``,
    ``G`` or ``B`` (a super-pixel channel frame), ``RGB`` (a debayered cube) or ``M`` (the mosaic).

    Binning never mixes colours: a channel frame's pixel is already a 2×2 cell, and ``binning``
    2N bins N×N cells (1 and 2 give the cells themselves); a cube's planes are binned one by one.
    The header gets FILTER, CFACHAN, XBINNING/YBINNING and WCS for the new pixels, and HISTORY.
    """
    original = header.get("FILTER")
    if channel == "M":
        out = header.copy()
        out.set("CFAPAT", pattern, "CFA colours of stored (0,0),(0,1),(1,0),(1,1)")
        out.add_history(
            f"colour mosaic CFA {pattern} (as stored) calibrated, not debayered, binned or resampled"
        )
        return mosaic, out
    if channel == "RGB":
        cube = debayer_bilinear(mosaic, pattern)
        if binning > 1:
            cube = np.stack([bin_image(plane, binning) for plane in cube])
        out = bin_header(header, binning)
        how = "RGB cube (planes R, G, B) debayered by bilinear interpolation"
        factor = binning
    else:
        factor = 2 * max(1, binning // 2)
        cube = superpixel(mosaic, pattern, channel)
        if factor > 2:
            cube = bin_image(cube, factor // 2)
        out = bin_header(header, factor)
        cells = factor // 2
        out.set("CFACELLS", cells, "CFA 2x2 cells per pixel and axis")
        offset_y, offset_x = site_offset(pattern, channel, cells)
        for axis, offset in (("1", offset_x), ("2", offset_y)):  # the WCS of the sites sampled
            if offset and f"CRPIX{axis}" in out:
                out[f"CRPIX{axis}"] = float(out[f"CRPIX{axis}"]) - offset
        sites_text = "mean of its 2 green sites" if channel == "G" else f"its {channel} site"
        how = f"{CHANNEL_FILTERS[channel]} channel: each pixel a 2x2 CFA cell's {sites_text}"
    for key in MOSAIC_CARDS:
        out.remove(key, ignore_missing=True, remove_all=True)
    name = CHANNEL_FILTERS.get(channel, channel)
    out.set("FILTER", name, "colour channel of a one-shot-colour camera")
    out.set("CFACHAN", channel, "channel(s) of the CFA mosaic this frame holds")
    out.set("CFAPAT", pattern, "CFA colours of stored (0,0),(0,1),(1,0),(1,1)")
    out.add_history(f"colour CFA {pattern} (as stored), FILTER was {original!r}: {how}")
    if factor > 1:
        out.add_history(f"binned {factor}x{factor} mosaic pixels, colours kept apart")
    return cube, out


def site_offset(pattern: str, channel: str, cells: int = 1) -> tuple[float, float]:
    """Where (``dy``, ``dx``, channel-frame pixels) a channel frame's samples sit from the
    centres of its pixels' cells: a super-pixel channel frame's pixel ``p`` (one 2×2 cell, or
    ``cells``×``cells`` of them when binned) sees the sky at ``p + offset`` of the green frame's
    grid, whose pixels sample the cell centre (the mean of two diagonal sites). Red at the
    cell's top-left site is a quarter cell up and left: (-0.25, -0.25); green is (0, 0)."""
    site_y, site_x = np.mean(sites(pattern, channel), axis=0)
    return (float(site_y) - 0.5) / (2 * cells), (float(site_x) - 0.5) / (2 * cells)


def channel_shift(shift: Shift, pattern: str, channel: str, cells: int = 1) -> Shift:
    """The registration of a channel frame from ``shift``, measured on its light's green frame.

    Every site moves with the sky, but a rotation turns a site's offset ``d`` from the cell
    centre (:func:`site_offset`) around with it: the frame's pixel ``p`` sees the sky at
    ``p + d``, which lands at ``M (p + d - c) + c + t`` (``M`` the whole map, 180° flip included,
    ``t`` the shift), and the output's pixel ``q`` samples ``q + d``, so the channel frame's shift
    is ``t + (M - I) d``: unchanged for a pure translation, ``t - 2d`` (half a cell for red and
    blue) after a meridian flip, and in between for any other turn.
    """
    offset = np.array(site_offset(pattern, channel, cells))
    dy, dx = np.array([shift.dy, shift.dx]) + (shift.total() - np.eye(2)) @ offset
    return replace(shift, dy=float(dy), dx=float(dx))


def green(data: np.ndarray) -> np.ndarray:
    """The image a frame is measured on (stars, sky, registration): the G plane of an RGB cube,
    else the frame itself."""
    return data[1] if data.ndim == 3 else data


def write_cube(target: Path, cube: np.ndarray, header: fits.Header) -> None:
    """Write a float32 cube to ``target`` atomically (a temporary file renamed into place), with
    CHECKSUM and DATASUM (:func:`imgproc.fitsio.checksum_problem` checks it before reuse)."""
    with replaced_atomically(target) as temporary:
        hdu = fits.PrimaryHDU(cube.astype(np.float32, copy=False), header=header)
        hdu.writeto(temporary, overwrite=True, checksum=True)  # DATASUM: reruns verify the cube


def read_frame(path: Path) -> tuple[np.ndarray, fits.Header]:
    """Pixels (float32) and header of an intermediate: a frame (:func:`imgproc.fitsio.read_image`)
    or an RGB cube (NAXIS = 3) written by :func:`write_cube`."""
    try:
        return read_image(path)
    except FitsError:
        with fits.open(path) as hdul:
            if hdul[0].header.get("NAXIS") != 3:
                raise
            return np.asarray(hdul[0].data, dtype=np.float32), hdul[0].header.copy()
