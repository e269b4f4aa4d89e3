"""Benchmark: imgproc against Siril (siril-cli, C with OpenMP), same frames, same cores.

    python bench/siril.py [--cores 2] [--size 2048] [--stack-frames 40] [--calibrate-frames 300]
                          [--repeat 2] [--data bench/data] [--stack-only] [--kernel K]

1. *stack*: a one-filter night of ``--stack-frames`` lights. imgproc ``-s -S 1 -a`` (one aligned,
   sigma-clipped stack: stars matched, frames resampled with imgproc's default kernel, Lanczos-4,
   or ``--kernel``) against Siril ``preprocess`` + ``register`` (its default: global star
   alignment, frames resampled with OpenCV's bicubic kernel into a new ``r_`` sequence) +
   ``stack rej s 3 3 -nonorm``; ``--kernel cubic`` compares like with like. Also imgproc's peak
   memory against the 1 GiB target.
2. *calibrate* on the same lights, for the record: imgproc against Siril ``preprocess``.
3. *calibrate* on the two-filter night of ``bench/run.py`` (``--calibrate-frames``): imgproc
   against Siril ``preprocess``, once per filter (Siril takes one flat per sequence).

Siril gets ``setcpu CORES``; both write 32-bit float FITS. Siril comes from Debian
(``apt-get install siril``; ``make bench`` installs it when it can). Without ``siril-cli`` this
script says so and exits with status 2. Each method runs ``--repeat`` times and the fastest run
counts, with the page cache flushed (``sync``) before each run, as in ``bench/run.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from run import BENCH, ensure_night, measure, night_params, ratio, warm_up  # type: ignore[import-not-found]

SIRIL = "siril-cli"


def siril_script(work: Path, cores: int, sequences: list[dict[str, str]], stack: bool) -> str:
    """A Siril (1.0) script: per sequence, link its lights, preprocess, and (``stack``) register
    them by matching stars (Siril's default method) and stack the registered frames."""
    lines = ["requires 1.0.0", f"setcpu {cores}", "setext fits", "set32bits"]
    for seq in sequences:
        lines += [
            f"cd {seq['src']}",
            f"link light -out={seq['dir']}",
            f"cd {seq['dir']}",
            f"preprocess light -bias={seq['bias']} -dark={seq['dark']} -flat={seq['flat']}",
        ]
        if stack:
            # star alignment writes the resampled frames as the sequence r_pp_light
            lines += ["register pp_light", f"stack r_pp_light rej s 3 3 -nonorm -out={work}/result"]
    return "\n".join(lines) + "\n"


def siril_sequences(meta: dict[str, Any], work: Path) -> list[dict[str, str]]:
    """One sequence per filter: a folder of links to that filter's lights, and its masters."""
    root = Path(meta["root"])
    sequences = []
    for name in sorted({light["filter"] for light in meta["lights"]}):
        lights = [light for light in meta["lights"] if light["filter"] == name]
        src, out = work / f"src-{name}", work / f"seq-{name}"
        src.mkdir(parents=True)
        out.mkdir(parents=True)
        for light in lights:
            (src / light["name"]).symlink_to(root / "lights" / light["name"])
        sequences.append({
            "src": str(src), "dir": str(out),
            "bias": str(root / "bias" / lights[0]["bias"]),
            "dark": str(root / "darks" / lights[0]["dark"]),
            "flat": str(root / "flats" / lights[0]["flat"]),
        })  # fmt: skip
    return sequences


def run_siril(meta: dict[str, Any], work: Path, cores: int, stack: bool, log: Path) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    sequences = siril_sequences(meta, work)
    script = work / "run.ssf"
    script.write_text(siril_script(work, cores, sequences, stack), encoding="utf-8")
    os.sync()
    result = measure([SIRIL, "-s", str(script)], cwd=work, log=log)
    made = sum(len(list(Path(seq["dir"]).glob("pp_light_*.fits"))) for seq in sequences)
    result["outcome"] = {"calibrated": made, "stack": (work / "result.fits").exists()}
    if made != len(meta["lights"]) or (stack and not result["outcome"]["stack"]):
        result["status"] = result["status"] or 1  # siril-cli can exit 0 after a failed command
    return result


def run_imgproc(
    meta: dict[str, Any], out: Path, cores: int, stack: bool, log: Path, kernel: str | None = None
) -> dict[str, Any]:
    root = Path(meta["root"])
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "imgproc.cli", str(root / "lights"), str(out),
        "-B", str(root / "bias"), "-D", str(root / "darks"), "-F", str(root / "flats"), "-c", str(cores),
        *(["-s", "-S", "1", "-a"] if stack else []),
        *(["--set", f"alignment.kernel={kernel}"] if stack and kernel else []),
    ]  # fmt: skip
    os.sync()
    result = measure(cmd, log=log)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    result["outcome"] = {key: summary.get(key) for key in ("outputs", "failed_outputs", "lights_skipped")}
    return result


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest successful run (or the last one), with every run's wall time."""
    ok = [r for r in runs if r["status"] == 0] or runs[-1:]
    chosen = min(ok, key=lambda r: r["wall_s"])
    chosen = {k: v for k, v in chosen.items() if not k.startswith("_")}
    chosen["all_walls_s"] = [r["wall_s"] for r in runs]
    return chosen


def compare(label: str, meta: dict[str, Any], args: argparse.Namespace, stack: bool) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"imgproc": [], "siril": []}
    logs = args.data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for rep in range(args.repeat):
        for method in runs:
            work = args.data / "runs" / f"siril-{label}-{method}"
            log = logs / f"siril-{label}-{method}.log"
            if method == "imgproc":
                run = run_imgproc(meta, work, args.cores, stack, log, args.kernel)
            else:
                run = run_siril(meta, work, args.cores, stack, log)
            print(
                f"[{label}] {method} run {rep + 1}: exit {run['status']}, wall {run['wall_s']} s, "
                f"cpu {run['cpu_s']} s, peak RSS {run['peak_rss_sum_mib']} MiB, {run['outcome']}",
                flush=True,
            )
            runs[method].append(run)
            if not args.keep_outputs:
                shutil.rmtree(work, ignore_errors=True)
    result = {method: best(items) for method, items in runs.items()}
    result["ratio_wall"] = ratio(result["imgproc"]["wall_s"], result["siril"]["wall_s"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--stack-frames", type=int, default=40)
    parser.add_argument("--calibrate-frames", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--data", type=Path, default=BENCH / "data")
    parser.add_argument("--keep-outputs", action="store_true")
    parser.add_argument("--stack-only", action="store_true", help="only the stack comparison (1.)")
    parser.add_argument("--kernel", choices=("lanczos4", "cubic", "spline", "bilinear"),
                        help="imgproc's resampling kernel in the stack (default: its config's)")  # fmt: skip
    args = parser.parse_args(argv)
    if shutil.which(SIRIL) is None:
        print(f"bench/siril.py: {SIRIL} not found; install Siril (apt-get install siril)", file=sys.stderr)
        return 2
    version = os.popen(f"{SIRIL} --version").read().strip()
    results: dict[str, Any] = {"siril": version, "cores": args.cores, "size": args.size,
                               "kernel": args.kernel or "default",
                               "date": datetime.now().isoformat(timespec="seconds")}  # fmt: skip
    one = night_params(args.stack_frames, args.size, filters=("V",))
    _, small = ensure_night(args.data, f"night-{args.stack_frames}x{args.size}-V", one)
    warm_up(Path(small["root"]))
    results["stack"] = compare("stack", small, args, stack=True)
    if args.stack_only:
        res = results["stack"]
        print(f"\nstack of {args.stack_frames} x {args.size}² ({args.kernel or 'default'} kernel): "
              f"imgproc {res['imgproc']['wall_s']:.2f} s, "
              f"siril {res['siril']['wall_s']:.2f} s, ratio {res['ratio_wall']:.2f}, "
              f"imgproc peak {res['imgproc']['peak_rss_sum_mib']:.0f} MiB")  # fmt: skip
        return 0
    results["calibrate_small"] = compare("calibrate-small", small, args, stack=False)
    _, large = ensure_night(args.data, f"night-{args.calibrate_frames}x{args.size}",
                            night_params(args.calibrate_frames, args.size))  # fmt: skip
    warm_up(Path(large["root"]))
    results["calibrate"] = compare("calibrate", large, args, stack=False)

    stack_rss = results["stack"]["imgproc"]["peak_rss_sum_mib"]
    rows = [
        ("stack", args.stack_frames, "preprocess+register+stack", results["stack"]),
        ("calibrate", args.stack_frames, "preprocess", results["calibrate_small"]),
        ("calibrate", args.calibrate_frames, "preprocess", results["calibrate"]),
    ]
    print(f"\nimgproc vs {version}: {args.size}² frames, {args.cores} cores, fastest of {args.repeat}")
    print(f"{'mode':10s} {'frames':>6s} {'siril steps':27s} {'imgproc s':>9s} {'siril s':>8s} {'ratio':>6s} "
          f"{'imgproc MiB':>11s} {'siril MiB':>9s}")  # fmt: skip
    for mode, frames, steps, res in rows:
        mine, theirs = res["imgproc"], res["siril"]
        print(
            f"{mode:10s} {frames:6d} {steps:27s} {mine['wall_s']:9.2f} {theirs['wall_s']:8.2f} "
            f"{res['ratio_wall']:6.2f} {mine['peak_rss_sum_mib']:11.0f} {theirs['peak_rss_sum_mib']:9.0f}"
        )
    checks = {
        "stack: imgproc / siril <= 1.0": results["stack"]["ratio_wall"] <= 1.0,
        "stack: imgproc peak memory < 1024 MiB": stack_rss < 1024,
        f"calibrate {args.calibrate_frames}: imgproc / siril <= 1.0": (
            results["calibrate"]["ratio_wall"] <= 1.0
        ),
    }
    results["targets"] = checks
    print("\ntargets:")
    for text, ok in checks.items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}")
    out = BENCH / "results" / f"siril-{datetime.now():%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
