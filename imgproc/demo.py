"""``python -m imgproc.demo [FOLDER]``: generate a demo night and reduce it twice.

The night (made once, then reused) has dithered lights in two filters and a set of masters that
includes non-matching distractors.  The first run calibrates every light; the second aligns and
stacks them.  Both print where their outputs are.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from imgproc.cli import EXIT_OK
from imgproc.cli import main as imgproc_main
from imgproc.synth import NightSpec, make_night

DEMO_SPEC = NightSpec(n_lights=12, shape=(256, 256), dither_px=4.0, n_stars=120, seed=1)


def run(folder: Path) -> int:
    """Make the demo night under ``folder`` (if absent) and run the two reductions."""
    night_root = folder / "night"
    if not (night_root / "lights").is_dir():
        print(f"demo: generating a night in {night_root}", flush=True)
        make_night(night_root, DEMO_SPEC)
    masters = [
        "-B",
        str(night_root / "bias"),
        "-D",
        str(night_root / "darks"),
        "-F",
        str(night_root / "flats"),
    ]
    runs = {
        "calibrated": [],
        "stacked": ["-a", "-s", "-S", "4"],
    }
    worst = EXIT_OK
    for name, flags in runs.items():
        output = folder / name
        print(
            f"\ndemo: imgproc {night_root / 'lights'} {output} -B ... -D ... -F ... {' '.join(flags)}",
            flush=True,
        )
        status = imgproc_main([str(night_root / "lights"), str(output), *masters, *flags])
        worst = max(worst, status)
        outputs = sorted(output.glob("*.fits"))
        print(f"demo: {len(outputs)} outputs in {output.resolve()} (exit status {status})")
        for path in outputs[:3]:
            print(f"  {path.name}")
        if len(outputs) > 3:
            print(f"  ... and {len(outputs) - 3} more; summary in {output.resolve() / 'summary.txt'}")
    return worst


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m imgproc.demo``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return run(Path(args[0] if args else "demo"))


if __name__ == "__main__":
    sys.exit(main())
