"""Sub-pixel registration of frames by translation, with an optional 180° meridian flip.

A :class:`Registrar` holds one reference frame (prepared and Fourier-transformed once) and
measures other frames against it by cross-correlation:

1. every frame is prepared alike: a median background mesh subtracted (removes gradients), NaN
   set to that background, the noise sigma estimated (MAD), and hot pixels and 2-pixel hot
   clusters (much brighter than their second brightest neighbour) flattened.  Two versions are
   kept: a *star map* clipped to ``[0, coarse_clip]`` sigma (every star weighs about the same,
   so a few bright stars, hot pixels or cosmics cannot win a chance alignment) and a *fine*
   version clipped to ``[-5, clip_sigma]``;
2. the integer shift is the peak of the full-frame circular cross-correlation of the tapered
   star maps (one forward FFT per frame against the stored reference spectrum, one inverse).
   Frames of 2048 px or more a side are binned 2×2 for this stage (a quarter of the FFT and
   preparation work), so the peak is known to about ±1 px;
3. the sub-pixel shift comes from the fine versions of the *overlapping* parts of frame and
   reference only (cut to FFT-friendly sizes, tapered alike, and zeroed alike where either
   frame has NaN, so that stars cut by a NaN region are cut in both): the correlation is
   evaluated by a matrix-multiply DFT at the integer shifts within ±2 px of the coarse peak
   (binned frames only), then on a ``1/upsample`` px grid within ±0.75 px of the best of them,
   then a parabola through the best grid point and its neighbours.  (Refining on the full
   frames instead let stars entering, leaving or wrapping around pull the peak: up to 0.5 px
   off on 128² frames dithered by up to a quarter of their size.)

scipy (``scipy.fft``, 0.15 s to import, and ``scipy.ndimage``) is imported by the functions that
use it, on first use: publishing a night's unaligned frames as hard links does not wait for it.

The matrix products (the DFT grids and the background mesh) go through BLAS, whose sums run in
an order that depends on its thread count.  A registrar therefore pins BLAS to one thread for the
whole process (:func:`one_blas_thread`): the same frames give the same shifts, and so the same
output bytes, whatever the cores, the SLURM allocation or ``OPENBLAS_NUM_THREADS``.

Plain (not phase-normalised) cross-correlation is used: phase correlation whitens the spectrum,
giving the noise-dominated high frequencies the same weight as the stars.

``Shift.quality`` is the correlation coefficient of the overlapping star maps (binned like the
integer stage) at the measured (nearest integer) shift.  Measured on synthetic fields (150 stars
per 256², FWHM 3 px): same field 0.8-0.95 (0.4-0.5 at 6× the noise); pure noise 0.03-0.07
(64²), 0.01-0.02 (256²), <0.01 (1024²); an unrelated star field ≈0.2 (128²), 0.07 (256²),
0.01 (1024²).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import bottleneck as bn
import numpy as np
from threadpoolctl import threadpool_limits

from imgproc.binning import binned_shape, block_sum
from imgproc.stars import (
    MAD_TO_STD,
    STAT_STEP,
    RowSource,
    Stars,
    background,
    despike,
    find_stars,
    noise_sigma,
    opencv,
)

__all__ = [
    "MODELS",
    "BandResampler",
    "MosaicRegistrar",
    "Registrar",
    "Shift",
    "StarRegistrar",
    "apply_shift",
    "one_blas_thread",
    "pier_side_flip",
    "registration_stars",
    "shift_from_map",
    "source_rows",
    "superpixels",
]

#: Side (px) of the central part of the overlap that the sub-pixel refinement correlates.
REFINE_MAX = 1024
#: Frames with both sides at least this long are binned 2×2 for the integer stage (binning
#: more lowered the significance of sparse fields' peaks towards ``min_significance``).
BIN_FROM = 2048
#: Fractional shifts smaller than this are treated as integers by :func:`apply_shift`.
_INTEGER_TOL = 1e-6
#: Correlation peaks weaker than this many robust sigmas are not accepted (:meth:`Registrar.accepts`).
MIN_SIGNIFICANCE = 15.0
#: Stars measured per frame (the brightest) for registration and frame quality.
REGISTRATION_STARS = 300


@dataclass(frozen=True)
class Shift:
    """Registration of one frame onto the reference grid.

    The frame is rotated by 180° first when ``flipped``; a pixel at ``p = (y, x)`` of the
    (possibly rotated) frame then lands at ``A (p - c) + c + (dy, dx)`` of the reference grid,
    with ``c = ((ny-1)/2, (nx-1)/2)`` the frame's centre and ``A`` the 2×2 matrix ``linear``
    (identity when None: a pure translation, ``scipy.ndimage.shift`` convention).

    Attributes
    ----------
    dy, dx
        Shift (pixels) of the frame's centre.
    flipped
        The frame is rotated by 180° (meridian flip) with respect to the reference.
    quality
        Correlation: coefficient (0..1) of the overlapping star maps at the measured shift.
        Stars: fraction of the frame's measured stars matched in the reference.
    significance
        Height of the cross-correlation peak above the surface's median in robust standard
        deviations: independent of frame size and star density (pure noise peaks at about
        ``sqrt(2 ln N)``, ~5 for 2048²).  Infinite for star matching.
    linear
        ``(a_yy, a_yx, a_xy, a_xx)``: the matrix ``A`` in (y, x) order, or None.
    method
        ``correlation`` (translation by cross-correlation) or ``stars`` (star matching).
    stars
        Stars matched between frame and reference (star matching), else 0.
    residual
        RMS (px) of the matched stars' distances after the fit (star matching), else NaN.
    transparency
        Median flux ratio (frame / reference) of the matched stars (star matching), else NaN.
    """

    dy: float
    dx: float
    flipped: bool
    quality: float
    significance: float = float("inf")
    linear: tuple[float, float, float, float] | None = None
    method: str = "correlation"
    stars: int = 0
    residual: float = float("nan")
    transparency: float = float("nan")

    def matrix(self) -> np.ndarray:
        """``A`` as a (2, 2) float64 array in (y, x) order."""
        if self.linear is None:
            return np.eye(2)
        return np.array(self.linear, dtype=np.float64).reshape(2, 2)

    @property
    def rotation(self) -> float:
        """Rotation (degrees, counter-clockwise on a display with y up) of ``A``, 180° flip
        not included."""
        a = self.matrix()
        return float(np.degrees(np.arctan2(a[0, 1], a[1, 1])))

    @property
    def scale(self) -> float:
        """Scale of ``A`` (square root of its determinant)."""
        return float(np.sqrt(abs(np.linalg.det(self.matrix()))))

    def total(self) -> np.ndarray:
        """The matrix of the whole map (``-A`` when flipped): a frame pixel ``p`` lands at
        ``total() (p - c) + c + (dy, dx)``."""
        return -self.matrix() if self.flipped else self.matrix()


def shift_from_map(
    total: np.ndarray, dy: float, dx: float, *, flip_beyond: float = 90.0, **fields: float | int | str
) -> Shift:
    """A :class:`Shift` from the whole map ``p -> total (p - c) + c + (dy, dx)``: rotations of
    more than ``flip_beyond`` degrees are written as a 180° flip and the remaining turn."""
    total = np.asarray(total, dtype=np.float64)
    flipped = abs(np.degrees(np.arctan2(total[0, 1], total[1, 1]))) > flip_beyond
    linear = -total if flipped else total
    matrix = tuple(float(v) for v in linear.ravel())
    fields.setdefault("quality", 1.0)
    return Shift(float(dy), float(dx), bool(flipped), linear=matrix, **fields)  # type: ignore[arg-type]


@functools.cache
def one_blas_thread() -> None:
    """Limit BLAS to one thread in this process, once (threadpoolctl).

    Multi-threaded BLAS splits a matrix product differently for each thread count, which moves
    a measured shift by ~1e-5 px and so changes an aligned output's bytes.  The pipeline's
    parallelism is its jobs, so nothing is lost.
    """
    threadpool_limits(limits=1, user_api="blas")


def pier_side_flip(reference_pierside: str | None, pierside: str | None) -> bool:
    """True when both pier sides are known (``EAST``/``WEST``, ``E``/``W``) and they differ."""
    ref, cur = _pier(reference_pierside), _pier(pierside)
    return ref is not None and cur is not None and ref != cur


def _pier(value: str | None) -> str | None:
    if value is None:
        return None
    text = str(value).strip().upper()
    if text in ("E", "EAST", "PIERSIDE_EAST"):
        return "E"
    if text in ("W", "WEST", "PIERSIDE_WEST"):
        return "W"
    return None


class Registrar:
    """Holds the reference (its FFT computed once) and measures frames against it.

    Parameters
    ----------
    reference
        2-D reference frame; NaN allowed.
    upsample
        Refinement grid is ``1/upsample`` px (a parabola then refines within one grid step).
    min_significance
        Frames whose ``Shift.significance`` is below this should be rejected by the caller
        (see :meth:`accepts`): measured, pure noise peaks at 4-5.5 sigma and unrelated star
        fields at 6-10, real matches at 30-400 (64² to 2048², 10 to 300 stars).
    background_box
        Cell size (px) of the median background mesh subtracted before correlating.
    clip_sigma
        The fine version (sub-pixel stage) is clipped at this many noise sigmas.
    coarse_clip
        The star map (integer-shift stage and ``quality``) is clipped at this many noise sigmas.
    taper
        Width (px) of the cosine taper applied at the edges before each FFT; 0 disables it.
    flip_margin
        With ``try_flip``, the rotated frame is chosen when its correlation peak is more than
        ``flip_margin`` times stronger than the unrotated one.
    Attributes
    ----------
    factor
        Binning of the integer stage: 2 for frames of :data:`BIN_FROM` px or more a side, else 1.
    """

    def __init__(
        self,
        reference: np.ndarray,
        *,
        upsample: int = 20,
        min_significance: float = MIN_SIGNIFICANCE,
        background_box: int = 64,
        clip_sigma: float = 50.0,
        coarse_clip: float = 10.0,
        taper: int = 16,
        flip_margin: float = 1.5,
    ) -> None:
        reference = np.asarray(reference)
        if reference.ndim != 2 or min(reference.shape) < 16:
            raise ValueError(f"reference must be 2-D and at least 16x16, got {reference.shape}")
        if upsample < 1:
            raise ValueError("upsample must be >= 1")
        self.shape: tuple[int, int] = reference.shape
        self.upsample = int(upsample)
        self.min_significance = float(min_significance)
        self.background_box = int(background_box)
        self.clip_sigma = float(clip_sigma)
        self.coarse_clip = float(coarse_clip)
        self.taper = int(taper)
        self.flip_margin = float(flip_margin)
        one_blas_thread()
        self.factor = 2 if min(self.shape) >= BIN_FROM else 1
        self._ref, self._ref_coarse, self._ref_invalid = self._prepare(reference)
        if self.factor > 1:
            self._ref_coarse = self._prepare(_binned(reference, self.factor))[1]
        self._ref_spec = _spectrum(self._ref_coarse, self.taper)

    @property
    def nbytes(self) -> int:
        """Bytes of the reference's arrays this registrar holds."""
        arrays = (self._ref, self._ref_coarse, self._ref_invalid, self._ref_spec)
        return sum(a.nbytes for a in arrays if a is not None)

    def accepts(self, shift: Shift) -> bool:
        """True when the correlation peak is significant (``shift.significance`` reaches
        ``min_significance``)."""
        return shift.significance >= self.min_significance

    def measure(self, image: np.ndarray, *, try_flip: bool = False) -> Shift:
        """Measure the shift putting ``image`` onto the reference grid.

        The integer peak comes from the full-frame cross-correlation (with ``try_flip`` the
        180°-rotated frame is scored from the same FFT and chosen when its peak is clearly
        stronger); the sub-pixel shift comes from the overlapping parts of the frame and the
        reference only, so that content entering or leaving the field (or wrapping around in
        the periodic FFT) cannot pull the peak.  ``quality`` is the correlation coefficient of
        the overlaps of the star maps (clipped at ``coarse_clip``) at the nearest integer shift.
        """
        image = np.asarray(image)
        if image.shape != self.shape:
            raise ValueError(f"image shape {image.shape} != reference shape {self.shape}")
        f = self.factor
        prepared: np.ndarray | None = None
        invalid: np.ndarray | None = None
        if f == 1:
            prepared, coarse, invalid = self._prepare(image)
        else:  # the fine version is prepared later, for the refined overlap only
            coarse = self._prepare(_binned(image, f))[1]
        spec = _spectrum(coarse, self.taper)
        # For the frame reversed through the origin, x[-n], the spectrum is conj(spec): its
        # cross-power is ref * spec, the frame's own is ref * conj(spec).
        flip_peak, flip_value, flip_significance = (0, 0), -np.inf, 0.0
        if try_flip:
            flip_peak, flip_value, flip_significance = self._coarse_peak(self._ref_spec * spec)
        np.conjugate(spec, out=spec)
        spec *= self._ref_spec
        peak, value, significance = self._coarse_peak(spec)
        del spec
        peak = (f * peak[0], f * peak[1])
        flipped = flip_value > self.flip_margin * max(value, 0.0)
        if flipped:
            significance = flip_significance
            # rot180(x)[n] = x[N-1-n] is x[-n] displaced by -1 (binned) px; the binned frame
            # rotated is the rotated frame binned from its (N mod f)-th row and column on
            peak = tuple(  # type: ignore[assignment]
                _wrap_int(f * (p + 1) - n % f, n) for p, n in zip(flip_peak, self.shape, strict=True)
            )
            image = image[::-1, ::-1]
            if f == 1:
                coarse, prepared = coarse[::-1, ::-1], prepared[::-1, ::-1]  # type: ignore[index]
                invalid = None if invalid is None else invalid[::-1, ::-1]
            else:  # binned anew: the rotated binning is off by the remainder row and column
                coarse = self._prepare(_binned(image, f))[1]
        dy, dx = self._refine(image, prepared, invalid, peak)
        quality = _overlap_correlation(self._ref_coarse, coarse, round(dy / f), round(dx / f))
        return Shift(dy, dx, flipped, quality, significance)

    # -- internals -------------------------------------------------------------------------------

    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Fine (clipped at ``clip_sigma``) and star-map (``coarse_clip``) versions, NaN mask."""
        data, sigma, invalid = _prepare(image, self.background_box)
        if not sigma > 0:  # noiseless (synthetic) frame
            return data, data, invalid
        coarse = np.clip(data, 0.0, self.coarse_clip * sigma)
        coarse -= coarse.mean(dtype=np.float64)
        np.clip(data, -5.0 * sigma, self.clip_sigma * sigma, out=data)
        return data, coarse, invalid

    def _coarse_peak(self, cross: np.ndarray) -> tuple[tuple[int, int], float, float]:
        """Integer peak of the cross-correlation, its value, and its significance: the height
        above the surface's median in robust standard deviations (1.4826 × MAD)."""
        import scipy.fft  # here, not above: see the module docstring

        ny, nx = self._ref_coarse.shape
        corr = scipy.fft.irfft2(cross, s=(ny, nx), workers=1)
        iy, ix = np.unravel_index(int(np.argmax(corr)), corr.shape)
        sample = corr[::STAT_STEP, ::STAT_STEP]
        centre = float(np.median(sample))
        spread = MAD_TO_STD * float(np.median(np.abs(sample - centre)))
        value = float(corr[iy, ix])
        significance = (value - centre) / spread if spread > 0 else float("inf")
        return (_wrap_int(int(iy), ny), _wrap_int(int(ix), nx)), value, significance

    def _refine(
        self,
        image: np.ndarray,
        prepared: np.ndarray | None,
        invalid: np.ndarray | None,
        peak: tuple[int, int],
    ) -> tuple[float, float]:
        """Sub-pixel peak of the correlation of the overlaps near integer shift ``peak``.

        ``prepared``/``invalid`` are the whole frame's fine version and NaN mask, or None to
        prepare the overlap of ``image`` alone.  Both overlaps are cut to an FFT-friendly size
        and tapered alike; the correlation is evaluated by a matrix-multiply DFT at the integer
        shifts within ``±factor`` px of ``peak`` (binned integer stage), then on a
        ``1/upsample`` grid within ±0.75 px of the best of them.
        """
        ny, nx = self.shape
        py, px = peak
        # output (reference) pixel y takes frame pixel y - py
        y0, x0 = max(0, py), max(0, px)
        h, w = min(ny, ny + py) - y0, min(nx, nx + px) - x0
        # the central REFINE_MAX² of a larger overlap: stars enough, a quarter of the FFT work
        y0, x0 = y0 + max(0, h - REFINE_MAX) // 2, x0 + max(0, w - REFINE_MAX) // 2
        h, w = _fast_len_below(min(h, REFINE_MAX)), _fast_len_below(min(w, REFINE_MAX))
        ref = self._ref[y0 : y0 + h, x0 : x0 + w]
        cut = (slice(y0 - py, y0 - py + h), slice(x0 - px, x0 - px + w))
        if prepared is None:
            img, invalid = self._prepare(image[cut])[0::2]  # type: ignore[assignment]
        else:
            img, invalid = prepared[cut], None if invalid is None else invalid[cut]
        if self._ref_invalid is not None or invalid is not None:
            union = np.zeros((h, w), bool)
            if self._ref_invalid is not None:
                union |= self._ref_invalid[y0 : y0 + h, x0 : x0 + w]
            if invalid is not None:
                union |= invalid
            ref, img = np.where(union, 0.0, ref), np.where(union, 0.0, img)
        cross = _spectrum(ref, self.taper) * np.conj(_spectrum(img, self.taper))
        if self.factor > 1:
            steps = np.arange(-self.factor, self.factor + 1, dtype=np.float64)
            grid = _dft_grid(cross, w, steps, steps)
            iy, ix = np.unravel_index(int(np.argmax(grid)), grid.shape)
            py, px = py + int(steps[iy]), px + int(steps[ix])
            cy, cx = steps[iy], steps[ix]
        else:
            cy = cx = 0.0
        up = self.upsample
        half = int(np.ceil(0.75 * up))
        fine = np.arange(-half, half + 1, dtype=np.float64) / up
        grid = _dft_grid(cross, w, cy + fine, cx + fine)
        if not np.any(grid):
            return float(py), float(px)
        iy, ix = np.unravel_index(int(np.argmax(grid)), grid.shape)
        oy = _parabola(grid[iy - 1 : iy + 2, ix]) if 0 < iy < grid.shape[0] - 1 else 0.0
        ox = _parabola(grid[iy, ix - 1 : ix + 2]) if 0 < ix < grid.shape[1] - 1 else 0.0
        return float(py + fine[iy] + oy / up), float(px + fine[ix] + ox / up)


class MosaicRegistrar:
    """A :class:`Registrar` for colour-sensor (Bayer mosaic) frames: it measures on 2×2
    superpixels (the sum of one red, two green and one blue site) and returns shifts in the
    frame's own pixels.

    On the raw mosaic the colour sites' different levels form a 2-px pattern that outweighs the
    stars in the correlation: measured on the Seestar S50 frames, the raw mosaic peaked at
    2.8-14 sigma (rejected), the superpixels at 127-187 sigma.  A 180° rotation is tried on the
    full frame, so that odd sizes bin the rotated frame on its own grid.
    """

    def __init__(self, reference: np.ndarray, **options: float) -> None:
        reference = np.asarray(reference)
        if reference.ndim != 2 or min(reference.shape) < 32:
            raise ValueError(f"a mosaic reference must be 2-D and at least 32x32, got {reference.shape}")
        self.shape: tuple[int, int] = reference.shape
        self._inner = Registrar(_binned(reference, 2), **options)  # type: ignore[arg-type]
        self.min_significance = self._inner.min_significance

    @property
    def nbytes(self) -> int:
        """Bytes of the reference's arrays this registrar holds."""
        return self._inner.nbytes

    def accepts(self, shift: Shift) -> bool:
        """True when the correlation peak is significant (:meth:`Registrar.accepts`)."""
        return self._inner.accepts(shift)

    def measure(self, image: np.ndarray, *, try_flip: bool = False) -> Shift:
        """The shift putting ``image`` onto the reference grid (see :meth:`Registrar.measure`)."""
        image = np.asarray(image)
        if image.shape != self.shape:
            raise ValueError(f"image shape {image.shape} != reference shape {self.shape}")
        shift = self._inner.measure(_binned(image, 2))
        if try_flip:
            turned = self._inner.measure(_binned(image[::-1, ::-1], 2))
            if turned.significance > self._inner.flip_margin * max(shift.significance, 0.0):
                shift = Shift(turned.dy, turned.dx, True, turned.quality, turned.significance)
        # superpixel j covers pixels 2j and 2j+1 of frame and reference alike: shifts double
        return Shift(2.0 * shift.dy, 2.0 * shift.dx, shift.flipped, shift.quality, shift.significance)


class StarRegistrar:
    """Registers frames by matching their stars to the reference's, at any rotation.

    Stars are found and measured by :func:`imgproc.stars.find_stars`.  The brightest
    ``match_stars`` of the frame and of the reference form triangles with their nearest
    neighbours; triangles are matched by their shape (ratios of the sides: invariant to shift,
    rotation, scale and flip).  Every matched triangle is a hypothesis (a similarity fitted to
    its three vertices), tested exhaustively, as a RANSAC whose samples are the triangle matches:
    the one that puts the most frame stars within ``match_radius`` px of a reference star wins
    (deterministic: no random sampling).  Random RANSAC on the star pairs the triangles propose
    (:func:`skimage.measure.ransac`) failed on frames overlapping the reference by half: only
    5 % of the proposed pairs were right, and 300 draws of three never drew three right ones.
    Then every measured star of the frame is paired with the nearest reference star within
    ``match_radius`` px of where the fit puts it, and the ``model`` is fitted by least squares
    to all pairs, twice, leaving out pairs beyond 3× the RMS distance (blends).

    A frame with fewer than ``min_matches`` matched stars, or whose fit is too loose
    (``max_error``), is measured by cross-correlation
    instead (a :class:`Registrar`, or a :class:`MosaicRegistrar` for ``mosaic``), translation
    (and 180° flip) only; :attr:`Shift.method` tells which registered it.

    Parameters
    ----------
    reference
        2-D reference frame; NaN allowed.
    model
        ``similarity`` (shift, rotation, scale), ``euclidean`` (shift, rotation) or ``affine``.
    max_stars
        Stars measured per frame (the brightest).
    match_stars
        Brightest stars of each frame that form triangles.
    min_matches
        Fewest matched stars for the star fit to be used.
    match_radius
        Pairing radius (px) of the refinement (at least half the stars' FWHM).
    max_error
        Largest standard error (px) of the fitted position, the matched stars' RMS distance
        over the square root of their number, for the star fit to be used: wide, faint stars
        (measured on the UMD ST-8 frames: FWHM 11-17 px, 40 stars, 1-2 px RMS over 12-15
        matches, and once 6 stars matched at a wrong 16° turn) are left to cross-correlation,
        which measures them better.
    mosaic
        The frames are colour-sensor mosaics: the fallback measures on 2×2 superpixels.
    options
        Passed to the fallback registrar.
    """

    def __init__(
        self,
        reference: np.ndarray,
        *,
        model: str = "similarity",
        max_stars: int = REGISTRATION_STARS,
        match_stars: int = 40,
        min_matches: int = 6,
        match_radius: float = 2.0,
        max_error: float = 0.1,
        mosaic: bool = False,
        stars: Stars | None = None,
        **options: float,
    ) -> None:
        reference = np.asarray(reference)
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        self.shape: tuple[int, int] = reference.shape
        self.model, self.max_stars, self.match_stars = model, int(max_stars), int(match_stars)
        self.min_matches, self.match_radius = int(min_matches), float(match_radius)
        self.max_error = float(max_error)
        self._reference, self._mosaic, self._options = reference, mosaic, options
        self.min_significance = float(options.get("min_significance", MIN_SIGNIFICANCE))
        self.factor = 2 if mosaic else 1  # stars of a mosaic are found on its superpixels
        self.reference_stars: Stars = stars if stars is not None else self.find_stars(reference)
        self._ref_yx = self.reference_stars.yx
        self._ref_tri = _triangles(self._ref_yx[: self.match_stars])

    @functools.cached_property
    def fallback(self) -> Registrar | MosaicRegistrar:
        """The cross-correlation registrar of the reference, made when a frame first needs it
        (its FFTs cost as much as registering a dozen frames by their stars)."""
        return (MosaicRegistrar if self._mosaic else Registrar)(self._reference, **self._options)

    def find_stars(self, image: np.ndarray) -> Stars:
        """The stars this registrar matches (:func:`registration_stars`)."""
        return registration_stars(image, mosaic=self._mosaic, max_stars=self.max_stars)

    @property
    def nbytes(self) -> int:
        """Bytes of the reference's arrays this registrar holds (the reference frame itself, for
        its fallback)."""
        return self._reference.nbytes + self._ref_yx.nbytes + sum(a.nbytes for a in self._ref_tri)

    def accepts(self, shift: Shift) -> bool:
        """True for a star fit; a cross-correlation by its significance."""
        return shift.method == "stars" or shift.significance >= self.min_significance

    def measure(self, image: np.ndarray, *, try_flip: bool = False, stars: Stars | None = None) -> Shift:
        """The transform putting ``image`` onto the reference grid (``stars``: its stars when
        already found).  ``try_flip`` matters only to the cross-correlation fallback: stars
        match at any rotation."""
        image = np.asarray(image)
        if image.shape != self.shape:
            raise ValueError(f"image shape {image.shape} != reference shape {self.shape}")
        if stars is None:
            stars = self.find_stars(image)
        fitted = self._fit(stars)
        if fitted is None:
            return self.fallback.measure(image, try_flip=try_flip)
        total, shift, matched, rms, transparency = fitted
        if self.factor == 2:
            # superpixel q covers pixels 2q and 2q+1: p = 2q + 0.5; with e = 2 c_q + 0.5 the map
            # p -> T(p - e) + e + 2d is T(p - c) + c + 2d + (I - T)(e - c)
            centre = (np.array(self.shape, dtype=np.float64) - 1.0) / 2.0
            e = 2.0 * (np.array(binned_shape(self.shape, 2), dtype=np.float64) - 1.0) / 2.0 + 0.5
            shift = 2.0 * shift + (np.eye(2) - total) @ (e - centre)
            rms *= 2.0
        if rms / np.sqrt(matched) > self.max_error:
            return self.fallback.measure(image, try_flip=try_flip)
        return shift_from_map(
            total,
            *shift,
            quality=matched / max(len(stars), 1),
            method="stars",
            stars=matched,
            residual=rms,
            transparency=transparency,
        )

    def _fit(self, stars: Stars) -> tuple[np.ndarray, np.ndarray, int, float, float] | None:
        """``(total, (dy, dx), matched, rms, transparency)`` of the fit (transparency: the
        median flux ratio of the matched stars), or None when too few stars match."""
        from scipy.spatial import cKDTree

        yx = stars.yx
        if len(yx) < self.min_matches or len(self._ref_yx) < self.min_matches:
            return None
        frame_tri, ref_tri = _triangles(yx[: self.match_stars]), self._ref_tri
        hypotheses = _triangle_matches(frame_tri[0], ref_tri[0])
        if len(hypotheses) == 0:
            return None
        similarity, kind = _model_class("similarity"), _model_class(self.model)
        # wide stars (seeing, focus) have looser centroids: the radius grows with their FWHM
        widths = [w for w in (stars.median_fwhm(), self.reference_stars.median_fwhm()) if np.isfinite(w)]
        radius = max([self.match_radius, *(0.5 * w for w in widths)])
        tree, frame_xy, ref_xy = cKDTree(self._ref_yx[:, ::-1]), yx[:, ::-1], self._ref_yx[:, ::-1]
        # every matched triangle is a hypothesis: the one that pairs the most of the frame's
        # brightest stars wins (the first of equals: deterministic)
        pick = _best_hypothesis(frame_xy, ref_xy, frame_tri[1], ref_tri[1], hypotheses, tree, radius)
        if pick is None:
            return None
        t, r = hypotheses[pick]
        best = similarity.from_estimate(frame_xy[frame_tri[1][t]], ref_xy[ref_tri[1][r]])
        if not best:
            return None
        model, limit = best, radius
        for _ in range(3):
            distance, index = tree.query(model(frame_xy), distance_upper_bound=limit)
            paired = np.isfinite(distance)
            # a reference star paired twice keeps its nearest frame star only
            order = np.lexsort((distance, index))
            first = np.ones(order.size, bool)
            first[1:] = index[order][1:] != index[order][:-1]
            paired[order[~first]] = False
            if paired.sum() < self.min_matches:
                return None
            refit = kind.from_estimate(frame_xy[paired], ref_xy[index[paired]])
            if not refit:
                return None
            model = refit
            rms = float(np.sqrt(np.mean(model.residuals(frame_xy[paired], ref_xy[index[paired]]) ** 2)))
            limit = min(radius, max(3.0 * rms, 0.05))
        matrix = np.asarray(model.params, dtype=np.float64)
        linear = matrix[:2, :2][::-1, ::-1]  # (x, y) -> (y, x) order
        offset = matrix[:2, 2][::-1]
        shape = binned_shape(self.shape, self.factor)
        centre = (np.array(shape, dtype=np.float64) - 1.0) / 2.0
        shift = linear @ centre + offset - centre  # p -> A(p - c) + c + shift
        ratio = stars.flux[paired] / self.reference_stars.flux[index[paired]]
        return linear, shift, int(paired.sum()), rms, float(np.median(ratio))


def registration_stars(
    image: np.ndarray | RowSource, *, mosaic: bool = False, max_stars: int = REGISTRATION_STARS
) -> Stars:
    """The stars registration matches in a frame, and frame quality is measured from
    (:func:`imgproc.stars.find_stars`): a colour sensor's ``mosaic`` on its 2×2 superpixels
    (positions in superpixels)."""
    return find_stars(superpixels(image) if mosaic else image, max_stars=max_stars)


#: Transform models of :class:`StarRegistrar`.
MODELS = ("similarity", "euclidean", "affine")


def _model_class(name: str) -> type:
    """The scikit-image transform class of a model (imported here: skimage takes 0.3 s)."""
    from skimage.transform import AffineTransform, EuclideanTransform, SimilarityTransform

    classes = {"similarity": SimilarityTransform, "euclidean": EuclideanTransform, "affine": AffineTransform}
    return classes[name]


#: Nearest neighbours (the star itself included) that form a star's triangles, and the largest
#: distance of two triangles' side ratios that still matches them.
_NEIGHBOURS = 5
_INVARIANT_TOL = 0.02
#: Stars (brightest first) a triangle hypothesis is scored by, and the fewest it must pair.
_SCORED_STARS = 60
_MIN_SCORED = 4


def _triangles(yx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Triangles of each star with its nearest neighbours: their invariants (shortest/longest
    and middle/longest side, (m, 2)) and vertices (m, 3) ordered by the side they face
    (shortest first)."""
    from itertools import combinations

    from scipy.spatial import cKDTree

    n = len(yx)
    if n < 3:
        return np.zeros((0, 2)), np.zeros((0, 3), int)
    k = min(_NEIGHBOURS, n)
    _, near = cKDTree(yx).query(yx, k=k)
    combos = np.array(list(combinations(range(k), 3)))
    tri = np.unique(np.sort(near[:, combos].reshape(-1, 3), axis=1), axis=0)
    p = yx[tri]  # (m, 3, 2)
    # side facing vertex i joins the two others
    sides = np.stack([np.hypot(*(p[:, (i + 1) % 3] - p[:, (i + 2) % 3]).T) for i in range(3)], axis=1)
    order = np.argsort(sides, axis=1, kind="stable")
    sides = np.take_along_axis(sides, order, axis=1)
    ok = sides[:, 0] > 1.0  # degenerate or duplicate stars
    invariants = sides[ok, :2] / sides[ok, 2:3]
    return invariants, np.take_along_axis(tri, order, axis=1)[ok]


def _best_hypothesis(
    frame_xy: np.ndarray,
    ref_xy: np.ndarray,
    frame_vertices: np.ndarray,
    ref_vertices: np.ndarray,
    hypotheses: np.ndarray,
    tree: Any,
    radius: float,
) -> int | None:
    """Index of the triangle pair (``hypotheses``) whose similarity transform puts the most of
    the frame's brightest :data:`_SCORED_STARS` stars within ``radius`` of a reference star
    (the first of equals), or None when none pairs :data:`_MIN_SCORED`.

    Every hypothesis is fitted at once, in closed form: with points as complex numbers, the
    least-squares similarity of the three vertices is ``w = a z + b`` with
    ``a = Σ (w - w̄) conj(z - z̄) / Σ |z - z̄|²`` (as scikit-image's Umeyama estimate, which then
    refits the winner), and one tree query scores them all: 2 ms for 300 hypotheses, where a
    fit and a query each took 50 ms.
    """
    z = frame_xy[frame_vertices[hypotheses[:, 0]]] @ np.array([1.0, 1j])  # (h, 3) complex
    w = ref_xy[ref_vertices[hypotheses[:, 1]]] @ np.array([1.0, 1j])
    zc, wc = z - z.mean(axis=1, keepdims=True), w - w.mean(axis=1, keepdims=True)
    a = (wc * zc.conj()).sum(axis=1) / (np.abs(zc) ** 2).sum(axis=1)
    b = w.mean(axis=1) - a * z.mean(axis=1)
    scored = frame_xy[:_SCORED_STARS] @ np.array([1.0, 1j])
    mapped = a[:, None] * scored[None, :] + b[:, None]  # (h, s)
    distance, _ = tree.query(
        np.stack([mapped.real.ravel(), mapped.imag.ravel()], axis=1), distance_upper_bound=radius
    )
    counts = np.isfinite(distance).reshape(mapped.shape).sum(axis=1)
    best = int(np.argmax(counts))
    return best if counts[best] >= _MIN_SCORED else None


def _triangle_matches(invariants: np.ndarray, ref_invariants: np.ndarray) -> np.ndarray:
    """(frame triangle, reference triangle) index pairs of like shape, closest first."""
    from scipy.spatial import cKDTree

    if len(invariants) == 0 or len(ref_invariants) == 0:
        return np.zeros((0, 2), int)
    distance, index = cKDTree(ref_invariants).query(invariants, distance_upper_bound=_INVARIANT_TOL)
    hit = np.flatnonzero(np.isfinite(distance))
    hit = hit[np.argsort(distance[hit], kind="stable")]
    return np.stack([hit, index[hit]], axis=1)


def _dft_grid(cross: np.ndarray, w: int, steps_y: np.ndarray, steps_x: np.ndarray) -> np.ndarray:
    """Correlation at the shifts ``steps_y`` × ``steps_x`` (any real values) from the half
    cross spectrum of two ``(h, w)`` arrays: the real part of its inverse DFT there."""
    h = cross.shape[0]
    ky = np.fft.fftfreq(h) * h
    kx = np.arange(w // 2 + 1, dtype=np.float64)
    kern_y = np.exp(2j * np.pi * np.outer(steps_y, ky) / h).astype(np.complex64)
    kern_x = np.exp(2j * np.pi * np.outer(kx, steps_x) / w).astype(np.complex64)
    kern_x *= _half_spectrum_weights(w)[:, None]
    return (kern_y @ (cross @ kern_x)).real


def _spectrum(prepared: np.ndarray, taper: int) -> np.ndarray:
    """Half spectrum (complex64) of a prepared array after the separable edge taper."""
    import scipy.fft

    if taper > 0:
        ny, nx = prepared.shape
        prepared = prepared * _taper(ny, taper)[:, None]
        prepared *= _taper(nx, taper)
    return scipy.fft.rfft2(prepared, workers=1)


def superpixels(image: np.ndarray) -> np.ndarray:
    """Float32 sums of 2×2 blocks of a colour sensor's mosaic (one red, two green and one blue
    site each); the odd last row and column are dropped."""
    return _binned(image, 2)


def _binned(image: np.ndarray, factor: int) -> np.ndarray:
    """Float32 sums of ``factor``×``factor`` blocks (a block with a NaN is NaN); the remainder
    rows and columns are dropped."""
    ny, nx = (n * factor for n in binned_shape(image.shape, factor))
    return block_sum(image[:ny, :nx], factor, np.float32)


def _half_spectrum_weights(n: int) -> np.ndarray:
    """Hermitian weights of an rfft's columns: the inner ones stand for two columns."""
    w = np.full(n // 2 + 1, 2.0, np.float32)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w


def _overlap_correlation(ref: np.ndarray, image: np.ndarray, iy: int, ix: int) -> float:
    """Correlation coefficient (clipped to 0..1) of ``ref[y, x]`` and ``image[y - iy, x - ix]``."""
    ny, nx = ref.shape
    y0, y1, x0, x1 = max(0, iy), min(ny, ny + iy), max(0, ix), min(nx, nx + ix)
    if y1 - y0 < 2 or x1 - x0 < 2:
        return 0.0
    a = ref[y0:y1, x0:x1]
    b = image[y0 - iy : y1 - iy, x0 - ix : x1 - ix]
    n = a.size
    # one pass per sum, no temporaries (the maps are nearly zero-mean: no cancellation issue)
    sa, sb = float(a.sum(dtype=np.float64)), float(b.sum(dtype=np.float64))
    saa = float(np.einsum("ij,ij->", a, a)) - sa * sa / n
    sbb = float(np.einsum("ij,ij->", b, b)) - sb * sb / n
    sab = float(np.einsum("ij,ij->", a, b)) - sa * sb / n
    if not (saa > 0 and sbb > 0):
        return 0.0
    return float(np.clip(sab / np.sqrt(saa * sbb), 0.0, 1.0))


def _fast_len_below(n: int) -> int:
    """Largest FFT-friendly (5-smooth) length <= n."""
    import scipy.fft

    m = n
    while m > 1 and scipy.fft.next_fast_len(m) != m:
        m -= 1
    return max(m, 1)


def _wrap_int(index: int, n: int) -> int:
    """Periodic index in (-n/2, n/2]."""
    index %= n
    return index - n if index > n // 2 else index


def _parabola(values: np.ndarray) -> float:
    """Offset (in steps, within ±0.5) of the vertex of the parabola through three samples."""
    left, mid, right = (float(v) for v in values)
    denom = left - 2.0 * mid + right
    if denom >= 0:
        return 0.0
    return float(np.clip(0.5 * (left - right) / denom, -0.5, 0.5))


@functools.lru_cache(maxsize=16)
def _taper(n: int, width: int) -> np.ndarray:
    """1-D cosine (Tukey) edge taper of length ``n``, symmetric (``w[i] == w[n-1-i]``)."""
    width = min(int(width), n // 4)
    ramp = np.ones(n, np.float32)
    if width > 0:
        edge = 0.5 - 0.5 * np.cos(np.pi * (np.arange(width) + 0.5) / width)
        ramp[:width] = edge
        ramp[n - width :] = edge[::-1]
    ramp.flags.writeable = False
    return ramp


def _prepare(image: np.ndarray, box: int) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Float32 copy, background mesh subtracted (NaN -> 0), despiked; noise sigma; NaN mask."""
    data = np.array(image, dtype=np.float32, copy=True)
    invalid = ~np.isfinite(data)
    if not invalid.any():
        invalid = None
    data -= background(data, box)
    if invalid is not None:
        data[invalid] = 0.0
    sigma = noise_sigma(data)
    if sigma > 0:
        despike(data, sigma)
    return data, sigma, invalid


#: Resampling kernels of :func:`apply_shift`, and how far (px) each reaches from a sample point.
KERNELS = {"bilinear": 1, "spline": 2, "cubic": 2, "lanczos4": 4}
#: Output rows of each band :class:`BandResampler` makes.
RESAMPLE_BAND_ROWS = 128
#: The kernels OpenCV resamples with (:func:`_opencv_warp`), by name.
OPENCV_KERNELS = ("cubic", "lanczos4")
#: A map that samples every pixel of the frame within this many pixels of where one translation
#: would (an equatorial mount's night: the fitted turn and scale are noise, 1e-6 or so) is
#: resampled as that translation, in two 1-D passes (:func:`_translated_rows`). That is 15×
#: faster than ``warpAffine``'s Lanczos-4 (13 ms against 200 ms on 2048²) and more exact than
#: its 1/32 px sample positions (up to 1/64 px off).
TRANSLATION_TOL = 0.01


def apply_shift(image: np.ndarray, shift: Shift, *, kernel: str = "bilinear") -> np.ndarray:
    """Float32 frame resampled onto the reference grid; pixels from outside the frame are NaN.

    The frame is rotated by 180° first when ``shift.flipped``, then mapped by ``shift``'s linear
    part (rotation, scale) and translated by ``(shift.dy, shift.dx)``.  Output pixels whose
    kernel footprint touches a NaN or the outside of the frame are NaN.  Pure integer shifts
    are exact copies with NaN borders for every kernel.  ``kernel``:

    ``bilinear``
        2×2: local, flux-preserving, no ringing; stars come out about 1.1× wider.
    ``spline``
        cubic spline (:mod:`scipy.ndimage`, NaN filled by the median for its prefilter, 4×4
        footprint): interpolating, so it keeps stars sharp.
    ``cubic``
        OpenCV's bicubic convolution (4×4, ``a = -0.75``: :func:`_opencv_warp`), Siril's
        registration kernel: as sharp on stars, 4-5× faster than Lanczos-4.
    ``lanczos4``
        OpenCV's Lanczos-4 (8×8, windowed sinc: :func:`_opencv_warp`): as sharp as the spline
        and 6-8× faster; passes more of the finest detail (and noise) than bicubic.

    With ``cubic`` and ``lanczos4``, a map within :data:`TRANSLATION_TOL` of a translation
    is resampled as that translation, in two 1-D passes (:func:`_translated_rows`).
    """
    data = np.asarray(image, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {data.shape}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {kernel!r}")
    iy, fy = _split(shift.dy)
    ix, fx = _split(shift.dx)
    if shift.linear is None and fy == 0.0 and fx == 0.0:
        return _integer_shift(data[::-1, ::-1] if shift.flipped else data, iy, ix)
    if kernel in OPENCV_KERNELS:
        return _opencv_warp(data, shift, kernel)
    if shift.linear is not None:
        return _warp(data, shift, order=1 if kernel == "bilinear" else 3)
    if shift.flipped:
        data = data[::-1, ::-1]
    if kernel == "bilinear":
        return _bilinear_shift(data, iy, fy, ix, fx)
    return _spline_shift(data, shift.dy, shift.dx)


def _inverse_map(shape: tuple[int, int], shift: Shift) -> tuple[np.ndarray, np.ndarray]:
    """``(inverse, offset)``: output pixel ``q`` of ``shift``'s map samples the frame at
    ``inverse @ q + offset`` (y, x order)."""
    centre = (np.array(shape, dtype=np.float64) - 1.0) / 2.0
    inverse = np.linalg.inv(shift.total())
    return inverse, centre - inverse @ (centre + np.array([shift.dy, shift.dx], dtype=np.float64))


def _opencv_warp(data: np.ndarray, shift: Shift, kernel: str) -> np.ndarray:
    """``data`` resampled by ``shift`` with OpenCV's ``warpAffine`` and the ``kernel`` of
    :data:`OPENCV_KERNELS` (Lanczos-4 or bicubic).

    OpenCV is a dependency for this (and star detection's smoothing), and it earns it: on a
    2048² frame Lanczos-4 takes 0.1 s and bicubic 0.03 s, against 0.6-0.9 s for scipy's cubic
    spline (:func:`_warp`); it releases the GIL (a publish job's threads resample in parallel;
    scipy.ndimage holds it), and on generated stars turned by 1.3° both keep their FWHM within
    0.2 % and their positions within 0.005 px RMS (OpenCV rounds sample positions to 1/32 px).
    Siril resamples registered frames with it too (bicubic in its ``register`` command). A NaN
    anywhere in the kernel's footprint, or the outside of the frame (border value NaN), makes
    the output pixel NaN by itself (0 × NaN is NaN). A near-translation takes the two 1-D
    passes of :func:`_translated_rows` instead.
    """
    return _opencv_rows(data, 0, data.shape, shift, kernel, (0, data.shape[0]))


def _opencv_rows(
    block: np.ndarray,
    first: int,
    shape: tuple[int, int],
    shift: Shift,
    kernel: str,
    rows: tuple[int, int],
) -> np.ndarray:
    """Output ``rows`` of a frame of ``shape`` resampled by ``shift`` with OpenCV, from
    ``block``, the frame's rows from ``first`` on (every row those output rows sample, with the
    kernel's reach: :func:`source_rows`)."""
    cv2 = opencv()
    inverse, offset = _inverse_map(shape, shift)
    translation = _translation(shape, inverse, offset)
    if translation is not None:
        return _translated_rows(block, first, shape, translation, kernel, rows)
    start, stop = rows
    # the block's own coordinates: output row q - start samples block row p - first
    local = offset + inverse[:, 0] * start - np.array([first, 0.0])
    matrix = np.array(  # (x, y) order: source = matrix @ (x, y, 1)
        [[inverse[1, 1], inverse[1, 0], local[1]], [inverse[0, 1], inverse[0, 0], local[0]]]
    )
    size = (shape[1], stop - start)
    if kernel == "lanczos4":
        return cv2.warpAffine(
            np.ascontiguousarray(block),
            matrix,
            size,
            flags=cv2.INTER_LANCZOS4 | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=float("nan"),
        )
    # OpenCV's bicubic path is erratic at the frame's edges with a NaN border (whole blocks of 8
    # pixels, and a row or two more, come out NaN): the border is replicated instead, and the
    # pixels whose 4×4 footprint reaches outside the frame are made NaN here
    out = cv2.warpAffine(
        np.ascontiguousarray(block),
        matrix,
        size,
        flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    out[~_footprint_inside(shape, inverse, offset, 1, 2, rows)] = np.nan
    return out


def _translation(
    shape: tuple[int, int], inverse: np.ndarray, offset: np.ndarray
) -> tuple[float, float] | None:
    """``(ty, tx)`` when the map ``p = inverse @ q + offset`` of a frame of ``shape`` samples
    every pixel within :data:`TRANSLATION_TOL` px of ``p = q + t`` (the map's own translation of
    the frame's centre), else None. Its farthest pixel from ``t`` is a corner: the deviation
    ``(inverse - I) (q - c)`` is largest there on each axis."""
    centre = (np.array(shape, dtype=np.float64) - 1.0) / 2.0
    if np.max(np.abs(inverse - np.eye(2)) @ centre) > TRANSLATION_TOL:
        return None
    ty, tx = inverse @ centre + offset - centre
    return float(ty), float(tx)


def _taps(kernel: str, frac: float) -> np.ndarray:
    """Float32 weights of the ``2 × reach`` taps ``floor(p) - reach + 1 … floor(p) + reach`` of a
    sample ``frac`` past ``floor(p)``: OpenCV's Lanczos-4 (``sinc(d) sinc(d/4)``, normalised to a
    sum of 1 as OpenCV does) or bicubic convolution (``a = -0.75``)."""
    reach = KERNELS[kernel]
    distance = frac + reach - 1 - np.arange(2 * reach, dtype=np.float64)
    if kernel == "lanczos4":
        weights = np.sinc(distance) * np.sinc(distance / 4)
        weights /= weights.sum()
    else:
        a, x = -0.75, np.abs(distance)
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        weights = np.where(x <= 1, near, np.where(x < 2, far, 0.0))
    return weights.astype(np.float32)


def _translated_rows(
    block: np.ndarray,
    first: int,
    shape: tuple[int, int],
    translation: tuple[float, float],
    kernel: str,
    rows: tuple[int, int],
) -> np.ndarray:
    """Output ``rows`` of a frame of ``shape`` whose pixel ``q`` samples the frame at ``q + t``
    (``translation``), from ``block`` (the frame's rows from ``first`` on, as for
    :func:`_opencv_rows`), by the ``kernel``'s taps along rows and then along columns
    (``cv2.sepFilter2D``). Each output pixel is the same sum of the same products whatever the
    block, so a frame resampled in bands is the same bits as resampled whole. A pixel whose
    footprint reaches outside the frame, or touches a NaN (0 × NaN is NaN), is NaN."""
    cv2 = opencv()
    (iy, fy), (ix, fx) = (_split(t) for t in translation)
    reach = KERNELS[kernel]
    below = reach - 1  # the taps of a sample at floor(p): floor(p) - below ... floor(p) + reach
    filtered = cv2.sepFilter2D(
        np.ascontiguousarray(block, dtype=np.float32),
        cv2.CV_32F,
        _taps(kernel, fx),
        _taps(kernel, fy),
        anchor=(below, below),
        borderType=cv2.BORDER_CONSTANT,
    )
    (ny, nx), (start, stop) = shape, rows
    out = np.full((stop - start, nx), np.nan, np.float32)
    # output q samples floor(p) = q + i: valid when below <= q + i and q + i + reach <= n - 1
    y0, y1 = max(start, below - iy), min(stop, ny - reach - iy)
    x0, x1 = max(0, below - ix), min(nx, nx - reach - ix)
    if y0 < y1 and x0 < x1:
        out[y0 - start : y1 - start, x0:x1] = filtered[y0 + iy - first : y1 + iy - first, x0 + ix : x1 + ix]
    return out


def source_rows(shape: tuple[int, int], shift: Shift, kernel: str, rows: tuple[int, int]) -> tuple[int, int]:
    """The frame's rows ``[lo, hi)`` that output ``rows`` resampled by ``shift`` sample, the
    kernel's reach (and a row for OpenCV's 1/32 px placing) included, within the frame."""
    inverse, offset = _inverse_map(shape, shift)
    ny, nx = shape
    corners = np.array([[q, x] for q in (rows[0], rows[1] - 1) for x in (0, nx - 1)], dtype=np.float64)
    sampled = corners @ inverse[0] + offset[0]
    reach = KERNELS[kernel]
    lo = int(np.floor(sampled.min())) - reach - 1
    hi = int(np.floor(sampled.max())) + reach + 2
    return min(max(lo, 0), ny), max(min(hi, ny), 0)


class BandResampler:
    """Rows of a frame resampled by ``shift`` with an OpenCV kernel, made a fixed band of
    :data:`RESAMPLE_BAND_ROWS` output rows at a time from only the source rows each band
    samples (``read(lo, hi)``: a frame's intermediate file, read as needed): a 61-megapixel
    frame is resampled without holding it whole. The bands are fixed, so the rows asked for
    (by strips of any height) are the same bits; the last band is kept for the next strip."""

    def __init__(
        self, read: Callable[[int, int], np.ndarray], shape: tuple[int, int], shift: Shift, kernel: str
    ):
        if kernel not in OPENCV_KERNELS:
            raise ValueError(f"kernel must be one of {OPENCV_KERNELS}, got {kernel!r}")
        self.read, self.shape, self.shift, self.kernel = read, shape, shift, kernel
        self._kept: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()  # the strips of a combine are read by several threads

    def _band(self, index: int) -> np.ndarray:
        with self._lock:
            kept = self._kept
        if kept is not None and kept[0] == index:
            return kept[1]
        ny, nx = self.shape
        rows = (index * RESAMPLE_BAND_ROWS, min(ny, (index + 1) * RESAMPLE_BAND_ROWS))
        lo, hi = source_rows(self.shape, self.shift, self.kernel, rows)
        if lo >= hi:  # the band samples nothing of the frame
            band = np.full((rows[1] - rows[0], nx), np.nan, np.float32)
        else:
            band = _opencv_rows(self.read(lo, hi), lo, self.shape, self.shift, self.kernel, rows)
        with self._lock:
            self._kept = (index, band)
        return band

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Output rows ``[start, stop)`` (float32)."""
        out = np.empty((stop - start, self.shape[1]), np.float32)
        for index in range(start // RESAMPLE_BAND_ROWS, (stop - 1) // RESAMPLE_BAND_ROWS + 1):
            first = index * RESAMPLE_BAND_ROWS
            band = self._band(index)
            a, b = max(start, first), min(stop, first + len(band))
            out[a - start : b - start] = band[a - first : b - first]
        return out


def _footprint_inside(
    shape: tuple[int, int],
    inverse: np.ndarray,
    offset: np.ndarray,
    below: int,
    above: int,
    rows: tuple[int, int] | None = None,
) -> np.ndarray:
    """Mask of the output pixels ``q`` (of the output ``rows``, default all) whose sample
    ``p = inverse @ q + offset`` has its kernel footprint, ``floor(p) - below`` to
    ``floor(p) + above`` on both axes, inside the frame.

    The map is affine, so each output row's pixels inside form one run of columns: found per
    row from the four bounds (a few arrays of one row's length), not per pixel.
    """
    ny, nx = shape
    r0, r1 = rows if rows is not None else (0, ny)
    rows = np.arange(r0, r1, dtype=np.float64)
    first, last = np.zeros(r1 - r0), np.full(r1 - r0, nx - 1.0)
    for axis, n in enumerate(shape):
        # p = slope * x + start(y) must stay within [below, n - 1 - above] (floor taken with a
        # tolerance: a sample on a whole pixel counts as that pixel)
        start, slope = inverse[axis, 0] * rows + offset[axis], inverse[axis, 1]
        low, high = below - _INTEGER_TOL, n - 1 - above + 1 - _INTEGER_TOL
        if abs(slope) < 1e-12:
            inside = (start >= low) & (start < high)
            last = np.where(inside, last, -1.0)
            continue
        a, b = (low - start) / slope, (high - start) / slope
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        first = np.maximum(first, np.ceil(lo - 1e-9))
        # p < high is strict: the last column is the one below hi
        last = np.minimum(last, np.ceil(hi - 1e-9) - 1)
    columns = np.arange(nx)
    return (columns[None, :] >= first[:, None]) & (columns[None, :] <= last[:, None])


def _warp(data: np.ndarray, shift: Shift, order: int) -> np.ndarray:
    """``data`` resampled by ``shift`` (with a linear part) with scipy, bilinear or cubic spline."""
    import scipy.ndimage

    ny, nx = data.shape
    inverse, offset = _inverse_map(data.shape, shift)
    bad = ~np.isfinite(data)
    filled = np.where(bad, bn.nanmedian(data), data).astype(np.float32) if bad.any() else data
    out = scipy.ndimage.affine_transform(
        filled, inverse, offset=offset, order=order, mode="nearest", output=np.float32
    )
    # NaN where the kernel reaches outside the frame: p must lie in [reach, n-1-reach]
    reach = 0.0 if order == 1 else 1.0
    rows, cols = np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64)
    for axis, n in enumerate((ny, nx)):
        p = (inverse[axis, 0] * rows + offset[axis])[:, None] + (inverse[axis, 1] * cols)[None, :]
        out[(p < reach - _INTEGER_TOL) | (p > n - 1 - reach + _INTEGER_TOL)] = np.nan
    if bad.any():
        reach_px = 1 if order == 1 else 2
        spread = scipy.ndimage.binary_dilation(bad, np.ones((2 * reach_px + 1,) * 2, bool))
        near = scipy.ndimage.affine_transform(spread.view(np.uint8), inverse, offset=offset, order=0, cval=1)
        out[near != 0] = np.nan
    return out


def _split(value: float) -> tuple[int, float]:
    """Integer and fractional (0 <= f < 1) parts, snapping near-integers."""
    whole = float(np.floor(value))
    frac = float(value) - whole
    if frac < _INTEGER_TOL:
        return int(whole), 0.0
    if frac > 1.0 - _INTEGER_TOL:
        return int(whole) + 1, 0.0
    return int(whole), frac


def _integer_shift(data: np.ndarray, iy: int, ix: int) -> np.ndarray:
    """out[y, x] = data[y - iy, x - ix], NaN where that is outside."""
    ny, nx = data.shape
    out = np.full((ny, nx), np.nan, np.float32)
    y0, y1 = max(0, iy), min(ny, ny + iy)
    x0, x1 = max(0, ix), min(nx, nx + ix)
    if y0 < y1 and x0 < x1:
        out[y0:y1, x0:x1] = data[y0 - iy : y1 - iy, x0 - ix : x1 - ix]
    return out


def _bilinear_shift(data: np.ndarray, iy: int, fy: float, ix: int, fx: float) -> np.ndarray:
    """out(y, x) = data(y - iy - fy, x - ix - fx), bilinear, by slicing (no coordinate arrays).

    The sample point lies between rows ``y-iy-1`` and ``y-iy`` (weights ``fy`` and ``1-fy``),
    likewise for columns; a zero fractional part uses only one row/column.  Columns are
    interpolated first, then rows: six passes over the frame instead of eight.
    """
    ny, nx = data.shape
    out = np.full((ny, nx), np.nan, np.float32)
    # output rows y need source rows y-iy-1 (if fy) .. y-iy inside [0, ny)
    y0 = max(0, iy + (1 if fy else 0))
    y1 = min(ny, ny + iy)
    x0 = max(0, ix + (1 if fx else 0))
    x1 = min(nx, nx + ix)
    if y0 >= y1 or x0 >= x1:
        return out
    rows = data[y0 - iy - (1 if fy else 0) : y1 - iy]
    if fx:
        across = np.multiply(rows[:, x0 - ix : x1 - ix], np.float32(1.0 - fx))
        across += np.float32(fx) * rows[:, x0 - ix - 1 : x1 - ix - 1]
    else:
        across = rows[:, x0 - ix : x1 - ix]
    acc = out[y0:y1, x0:x1]
    if fy:
        np.multiply(across[1:], np.float32(1.0 - fy), out=acc)
        acc += np.float32(fy) * across[:-1]
    else:
        acc[...] = across
    return out


def _spline_shift(data: np.ndarray, dy: float, dx: float) -> np.ndarray:
    import scipy.ndimage

    bad = ~np.isfinite(data)
    filled = data
    if bad.any():
        filled = np.where(bad, bn.nanmedian(data), data).astype(np.float32)
    out = scipy.ndimage.shift(filled, (dy, dx), order=3, mode="nearest")
    out = out.astype(np.float32, copy=False)
    # out[y] samples p = y - dy; the cubic uses rows floor(p)-1 .. floor(p)+2, i.e. rows
    # r-2 .. r+1 of r = y - iy (a single row r when the fraction is 0), likewise for columns.
    iy, fy = _split(dy)
    ix, fx = _split(dx)
    reach_y = (-2, 1) if fy else (0, 0)
    reach_x = (-2, 1) if fx else (0, 0)
    padded = np.pad(bad, 2, constant_values=True)
    ny, nx = data.shape
    touched = np.zeros_like(bad)
    for oy in range(reach_y[0], reach_y[1] + 1):
        for ox in range(reach_x[0], reach_x[1] + 1):
            touched |= padded[2 + oy : 2 + oy + ny, 2 + ox : 2 + ox + nx]
    moved = _integer_shift(touched.astype(np.float32), iy, ix)
    out[moved != 0.0] = np.nan  # NaN (outside) compares unequal too
    return out
