"""Frame quality: what :func:`imgproc.stars.find_stars` measured on a frame, and the rules that
leave bad frames out of a stack.

Each rule compares a frame with the median of the frames of its stack (as WBPP's and Siril's
frame selection compare with the sequence), so it follows the night's seeing and sky rather than
absolute numbers; a stack of fewer than :data:`MIN_FRAMES` frames is not judged.  The defaults
catch a frame whose stars are twice as wide (defocus, wind), which lost more than half of its
stars (clouds) or whose stars are trailed, and let a clean night's frames through (measured on
generated nights: FWHM within ±5 % of the median, star count within ±15 %, roundness within 0.03).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from imgproc.stars import RowSource, Stars

__all__ = [
    "MIN_FRAMES",
    "MIN_STARS",
    "FrameQuality",
    "QualityRules",
    "best_frame",
    "frame_quality",
    "measure_frame",
    "quality_weights",
    "rejections",
]

#: Fewest frames of a stack for the rules to apply (a median of two says nothing).
MIN_FRAMES = 3
#: Fewest stars (the stack's median) for the rules to apply: the counts and medians of a few
#: stars vary too much from frame to frame to judge by.
MIN_STARS = 10


@dataclass(frozen=True)
class FrameQuality:
    """Measured quality of one frame.

    Attributes
    ----------
    fwhm
        Median FWHM of its stars (px of the frame).
    roundness
        Median minor / major axis ratio of its stars (1 = round).
    stars
        Stars detected (up to the finder's ``max_stars``).
    sky
        Median sky level (ADU).
    noise
        Noise sigma (ADU).
    transparency
        Median flux ratio of its stars matched in the reference (NaN when not matched).
    """

    fwhm: float
    roundness: float
    stars: int
    sky: float
    noise: float
    transparency: float = float("nan")

    def record(self) -> dict[str, float | int | None]:
        """Rounded values for receipts and the report (NaN as None)."""
        digits = {"fwhm": 3, "roundness": 3, "sky": 2, "noise": 3, "transparency": 3}
        return {
            key: (None if isinstance(v, float) and not math.isfinite(v) else round(v, digits.get(key, 0)))
            for key, v in asdict(self).items()
        }

    @classmethod
    def from_record(cls, record: dict[str, float | int | None]) -> FrameQuality:
        """The quality a :meth:`record` holds."""
        return cls(**{key: float("nan") if value is None else value for key, value in record.items()})  # type: ignore[arg-type]

    def text(self) -> str:
        """One line: ``fwhm=2.41 round=0.93 stars=212 sky=803.1 transp=0.98``."""
        return (
            f"fwhm={self.fwhm:.2f} round={self.roundness:.2f} stars={self.stars} sky={self.sky:.1f} "
            f"transp={self.transparency:.2f}"
        )


def frame_quality(stars: Stars, *, factor: int = 1, transparency: float = float("nan")) -> FrameQuality:
    """The quality of a frame from its stars (measured on ``factor``×``factor`` superpixels:
    FWHM scaled back to the frame's pixels)."""
    return FrameQuality(
        fwhm=stars.median_fwhm() * factor,
        roundness=stars.median_roundness(),
        stars=len(stars),
        sky=stars.sky / factor**2,
        noise=stars.noise / factor,
        transparency=transparency,
    )


def measure_frame(data: np.ndarray | RowSource, *, mosaic: bool = False) -> tuple[FrameQuality, Stars]:
    """The quality of a frame from its pixels, and the stars it is made of: those registration
    matches (:func:`imgproc.align.registration_stars`; a colour sensor's ``mosaic`` is measured
    on its 2×2 superpixels)."""
    from imgproc.align import registration_stars

    stars = registration_stars(data, mosaic=mosaic)
    return frame_quality(stars, factor=2 if mosaic else 1), stars


def best_frame(qualities: dict[str, FrameQuality], rules: QualityRules | None = None) -> str | None:
    """The key of the sharpest frame that the ``rules`` would keep (lowest FWHM; equal ones: the
    most stars, then the first key in sorted order), or None without any measured frame.

    Every frame is eligible when fewer than :data:`MIN_FRAMES` are measured."""
    keys = sorted(qualities)
    rejected = rejections([qualities[k] for k in keys], rules or QualityRules())
    eligible = [k for i, k in enumerate(keys) if i not in rejected and qualities[k].stars > 0]
    if not eligible:
        return None
    return min(eligible, key=lambda k: (qualities[k].fwhm, -qualities[k].stars, k))


def quality_weights(qualities: Sequence[FrameQuality]) -> list[float]:
    """Weights of frames in a combine from their quality: ``(transparency / (noise x FWHM))²``,
    the squared signal-to-noise ratio of a star (its flux against the noise within its width),
    scaled to a mean of 1.  A value not measured (NaN, or not positive) is the median of the
    others' (1 for the transparency of frames registered by cross-correlation)."""
    columns = [[q.transparency for q in qualities], [q.noise for q in qualities], [q.fwhm for q in qualities]]
    transparency, noise, fwhm = (_filled(np.array(values, dtype=np.float64)) for values in columns)
    weights = (transparency / (noise * fwhm)) ** 2
    return [float(w) for w in weights / weights.mean()]


def _filled(values: np.ndarray) -> np.ndarray:
    """``values`` with the NaN and non-positive ones replaced by the median of the others (1
    when there are none)."""
    good = np.isfinite(values) & (values > 0)
    return np.where(good, values, float(np.median(values[good])) if good.any() else 1.0)


@dataclass(frozen=True)
class QualityRules:
    """Rules that reject a frame from its stack (None: that rule is off).

    Attributes
    ----------
    fwhm_ratio
        Rejected when its FWHM exceeds this many times the stack's median FWHM.
    stars_ratio
        Rejected when it has fewer than this fraction of the stack's median star count.
    roundness_drop
        Rejected when its roundness is below the stack's median roundness by more than this.
    """

    fwhm_ratio: float | None = 1.5
    stars_ratio: float | None = 0.5
    roundness_drop: float | None = 0.15


def rejections(qualities: Sequence[FrameQuality | None], rules: QualityRules) -> dict[int, str]:
    """Indices of the frames the rules reject, with the reason (the rule and the numbers).

    Frames without a measurement (None) are neither judged nor counted in the medians; nothing
    is judged in a stack of fewer than :data:`MIN_FRAMES` measured frames or :data:`MIN_STARS`
    stars (median).
    """
    measured = [(i, q) for i, q in enumerate(qualities) if q is not None]
    if len(measured) < MIN_FRAMES:
        return {}
    stars = float(np.median([q.stars for _, q in measured]))
    if stars < MIN_STARS:
        return {}
    measured = [(i, q) for i, q in measured if q.stars > 0]
    fwhm = float(np.median([q.fwhm for _, q in measured]))
    roundness = float(np.median([q.roundness for _, q in measured]))
    out: dict[int, str] = {}
    for i, q in enumerate(qualities):
        if q is None:
            continue
        reasons = []
        if rules.stars_ratio is not None and q.stars < rules.stars_ratio * stars:
            reasons.append(f"{q.stars} stars < {rules.stars_ratio:g} x median {stars:g}")
        if q.stars > 0:
            if rules.fwhm_ratio is not None and q.fwhm > rules.fwhm_ratio * fwhm:
                reasons.append(f"FWHM {q.fwhm:.2f} px > {rules.fwhm_ratio:g} x median {fwhm:.2f} px")
            if rules.roundness_drop is not None and q.roundness < roundness - rules.roundness_drop:
                reasons.append(
                    f"roundness {q.roundness:.2f} < median {roundness:.2f} - {rules.roundness_drop:g}"
                )
        if reasons:
            out[i] = "rejected by quality: " + "; ".join(reasons)
    return out
