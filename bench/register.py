"""Benchmark: registration and resampling cost per frame, in one process on one core.

    python bench/register.py [--size 2048] [--stars 80,300] [--frames 5]

A reference and ``--frames`` frames of a generated star field (``--stars`` stars per frame,
FWHM 3 px, turned by 0.3-2° and shifted by up to 40 px) are registered by
:class:`imgproc.align.StarRegistrar` (star matching) and by :class:`imgproc.align.Registrar`
(cross-correlation, translation only), and resampled by :func:`imgproc.align.apply_shift`
(Lanczos-4, bicubic, cubic spline and bilinear, whole frame). The fastest of the frames is
reported for each step, with the star fit's residual against the true positions. Results go to
``bench/results/register-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from imgproc.align import KERNELS, Registrar, StarRegistrar, apply_shift, one_blas_thread  # noqa: E402
from imgproc.synth import field_positions, random_stars, star_field  # noqa: E402


def timed(call, *args, **kwargs):
    start = time.perf_counter()
    value = call(*args, **kwargs)
    return value, time.perf_counter() - start


def case(size: int, n_stars: int, frames: int) -> dict:
    rng = np.random.default_rng(n_stars)
    shape = (size, size)
    stars = random_stars((2 * size, 2 * size), 4 * n_stars, rng, flux_range=(3e3, 3e5))
    stars[:, :2] -= size / 2

    def frame(**view) -> np.ndarray:
        image = star_field(shape, stars, fwhm=3.0, **view) + 200.0
        return (image + rng.normal(0.0, 6.0, shape)).astype(np.float32)

    reference = frame()
    stars_reg, build_stars = timed(StarRegistrar, reference)
    corr_reg, build_corr = timed(Registrar, reference)
    steps: dict[str, list[float]] = {"stars": [], "correlation": [], **{kernel: [] for kernel in KERNELS}}
    residuals = []
    for k in range(frames):
        view = {"rotation": 0.3 + 0.4 * k, "shift": (rng.uniform(-40, 40), rng.uniform(-40, 40))}
        image = frame(**view)
        fit, seconds = timed(stars_reg.measure, image)
        steps["stars"].append(seconds)
        steps["correlation"].append(timed(corr_reg.measure, image)[1])
        for kernel in KERNELS:
            steps[kernel].append(timed(apply_shift, image, fit, kernel=kernel)[1])
        truth = field_positions(shape, stars[:, :2], **view)
        inside = np.all((truth >= 0) & (truth <= size - 1), axis=1) & np.all(
            (stars[:, :2] >= 0) & (stars[:, :2] <= size - 1), axis=1
        )
        centre = (np.array(shape) - 1.0) / 2.0
        mapped = (truth[inside] - centre) @ fit.total().T + centre + (fit.dy, fit.dx)
        residuals.append(float(np.sqrt(np.mean(np.sum((mapped - stars[inside, :2]) ** 2, axis=1)))))
        assert fit.method == "stars", fit
    return {
        "size": size,
        "stars_per_frame": n_stars,
        "build_s": {"stars": round(build_stars, 3), "correlation": round(build_corr, 3)},
        "per_frame_s": {key: round(min(values), 3) for key, values in steps.items()},
        "residual_px_max": round(max(residuals), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--stars", default="80,300", help="comma list of stars per frame")
    parser.add_argument("--frames", type=int, default=5)
    args = parser.parse_args(argv)
    one_blas_thread()
    results = {"date": datetime.now().isoformat(timespec="seconds"), "cases": []}
    names = ("size", "stars", "match s", "xcorr s", "lanczos s", "cubic s", "spline s", "bilin s", "resid px")
    print(" ".join(f"{name:>8}" for name in names))
    for n in (int(v) for v in args.stars.split(",")):
        res = case(args.size, n, args.frames)
        results["cases"].append(res)
        t = res["per_frame_s"]
        steps = ("stars", "correlation", "lanczos4", "cubic", "spline", "bilinear")
        times = " ".join(f"{t[key]:>8.3f}" for key in steps)
        print(f"{args.size:>8} {n:>8} {times} {res['residual_px_max']:>8.4f}")
    out = BENCH / "results" / f"register-{datetime.now():%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
