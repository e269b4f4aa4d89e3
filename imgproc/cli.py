"""The ``imgproc`` command: the original tool's flags mapped to workflow config and ``--cores``.

It checks the folders, resolves the output folder, writes the resolved config into it as
``imgproc.yaml`` and runs Snakemake there.  Running the same command again resumes: a lock left
by a killed run is cleared (a live run's lock is respected) and incomplete jobs are redone.

Exit status: 0 every light processed; 1 the workflow failed, or an output or light failed with an
internal error (a bug: its traceback is in ``logs/``); 2 usage or folder error; 3 finished, but
some lights or outputs were skipped for a problem of the input (an unreadable or truncated file,
no matching master, a frame that could not be aligned, a foreign file at an output's name); see
``summary.txt`` in the output folder.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from imgproc import __version__
from imgproc.console import SNAKEMAKE_LOG, relay, start_line, summary_lines
from imgproc.keywords import normalise
from imgproc.manifest import list_fits, missing_filter, output_conflict, read_tsv
from imgproc.naming import check_observer, default_output_dirname
from imgproc.overrides import OverrideError, apply_overrides, check_config, take_snakemake_config
from imgproc.plan import MAX_BIN, calibration_gaps, format_plan
from imgproc.progress import ProgressMonitor
from imgproc.verify import clean_intermediates, invalidate, remove_scratch

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143
CONFIG_NAME = "imgproc.yaml"
#: Snakemake arguments of a run that does not make the outputs (its log is shown in full).
PARTIAL_RUNS = ("-n", "--dry-run", "--dryrun", "--lint", "--unlock", "--until", "--omit-from", "--list-rules")
#: Seconds between whole-run progress lines.
PROGRESS_SECONDS = 10.0
#: Seconds a stopped run's jobs get to end before they are killed.
STOP_SECONDS = 60.0
#: Thread pools of the numeric libraries: one thread each. The jobs run as threads of the
#: Snakemake process and are the parallelism (``--cores``); BLAS threads on top would only
#: compete with them (registration pins BLAS to one thread anyway: ``align.one_blas_thread``).
ONE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


class UsageError(Exception):
    """A mistake the user can fix; printed as one line, no traceback."""


def workflow_dir() -> Path:
    """Folder holding the Snakefile: inside the installed package, or the source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "workflow", here.parent):
        if (candidate / "Snakefile").is_file():
            return candidate
    raise UsageError(f"the imgproc workflow files were not found beside {here}")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def bin_level(text: str) -> int:
    """argparse type: a binning factor from 1 to :data:`imgproc.plan.MAX_BIN`."""
    value = positive_int(text)
    if value > MAX_BIN:
        raise argparse.ArgumentTypeError(f"{value} is more than {MAX_BIN}")
    return value


def observer_code(text: str) -> str:
    """argparse type: an observer code (:func:`imgproc.naming.check_observer`)."""
    try:
        return check_observer(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def object_name(text: str) -> str:
    """argparse type: an OBJECT value (printable ASCII, as a FITS card holds)."""
    if not text.strip() or not text.isascii() or not text.isprintable() or len(text) > 68:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1-68 printable ASCII characters")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command line of the original tool, plus pass-through of Snakemake arguments."""
    parser = argparse.ArgumentParser(
        prog="imgproc",
        description="Calibrate, bin, align and stack a night of FITS frames (a Snakemake workflow).",
        epilog="Arguments after -- go to Snakemake, e.g. -- --dry-run or -- --profile profiles/slurm. "
        "Exit status: 0 all done, 1 workflow failed or an internal error (see OUTPUT_DIR/logs), "
        "2 usage error, 3 some lights skipped (bad input; see OUTPUT_DIR/summary.txt).",
    )
    parser.add_argument("input_dir", type=Path, help="folder of raw light frames")
    parser.add_argument(
        "output_dir", type=Path, nargs="?",
        help="output folder (default: <OBJECT>_<YYYY-MM-DD>_<OBSERVER>_CAL beside the input folder)",
    )  # fmt: skip
    parser.add_argument("-B", "--bias-dir", type=Path, help="folder of master bias frames")
    parser.add_argument("-D", "--dark-dir", type=Path, help="folder of master dark frames")
    parser.add_argument("-F", "--flat-dir", type=Path, help="folder of master flat frames")
    parser.add_argument("-b", "--bin-level", type=bin_level, default=1,
                        help=f"binning factor, 1 to {MAX_BIN} (default 1)")  # fmt: skip
    parser.add_argument("-a", "--align", action="store_true", help="align frames (sub-pixel)")
    parser.add_argument("-s", "--stack", action="store_true", help="stack groups of frames")
    parser.add_argument(
        "-S", "--stack-threshold", type=positive_int, default=150, metavar="N",
        help="with -s: a sequence of more than N frames is stacked into about N outputs, in "
        "consecutive groups of round(frames/N); a shorter one stays single frames. Example: -s -S 20 "
        "makes a 300-frame sequence 20 stacks of 15 frames, and leaves a 12-frame one as 12 frames "
        "(default 150)",
    )  # fmt: skip
    parser.add_argument("-o", "--observer", type=observer_code, default="DGAH",
                        help="observer code: letters, digits, . _ + - (default DGAH)")  # fmt: skip
    parser.add_argument(
        "-f", "--filter",
        help="only process lights with this filter (case-insensitive; a filter no light has is an error)",
    )  # fmt: skip
    parser.add_argument("-c", "--concurrency", type=positive_int, default=os.cpu_count() or 1,
                        help="number of processes (default: CPU count)")  # fmt: skip
    parser.add_argument(
        "--colour", choices=("channels", "green", "rgb", "mosaic"),
        help="what a colour (Bayer) light becomes: TR/TG/TB frames, TG only, an RGB cube or the "
        "calibrated mosaic (default: config colour.output, channels)",
    )  # fmt: skip
    parser.add_argument(
        "--cfa", choices=("auto", "none", "RGGB", "GRBG", "GBRG", "BGGR"),
        help="CFA pattern of every light, as stored (none: all mono; default: config colour.pattern, "
        "auto: from the header)",
    )  # fmt: skip
    parser.add_argument(
        "--object", metavar="NAME", type=object_name,
        help="OBJECT of lights whose header has none (TIRCAM2), for their names and OBJECT card; a "
        "header's own OBJECT wins (--plan says which lights got NAME)",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="set a config.yaml key, dotted for a nested one, the value read as YAML and checked "
        "against the schema; repeatable; written into OUTPUT_DIR/imgproc.yaml. Example: "
        "--set stacking.method=median --set alignment.reference=middle",
    )  # fmt: skip
    parser.add_argument(
        "--clean", action="store_true",
        help="delete the intermediates (OUTPUT_DIR/work/cal) once the outputs are written; a rerun "
        "recognises the outputs by their headers",
    )  # fmt: skip
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="show Snakemake's log (always in OUTPUT_DIR/logs/snakemake.log) and per-frame diagnostics",
    )  # fmt: skip
    parser.add_argument(
        "--plan", action="store_true",
        help="only show (and write to OUTPUT_DIR/plan.txt) what every light will become; calibrate nothing",
    )  # fmt: skip
    parser.add_argument(
        "--verify", action="store_true",
        help="before the run, read every intermediate and output of earlier runs and redo any whose "
        "pixels do not match their DATASUM (sizes are always checked)",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"imgproc {__version__}")
    return parser


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split the arguments at the first ``--`` into ours and Snakemake's.

    Snakemake runs inside the output folder, so a relative ``--profile`` path is made absolute
    here (a bare profile name that is not a folder here is left for Snakemake to look up).
    """
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    extra = argv[cut + 1 :]
    for index, value in enumerate(extra[:-1]):
        if value == "--profile" and Path(extra[index + 1]).is_dir():
            extra[index + 1] = str(Path(extra[index + 1]).resolve())
    return argv[:cut], extra


def check_folder(path: Path, what: str) -> Path:
    """An existing folder, resolved; else a UsageError saying what to do."""
    if not path.is_dir():
        raise UsageError(f"{what} {path} is not a folder; check the path")
    return path.resolve()


def default_output_dir(input_dir: Path, observer: str, keywords: dict[str, list[str]]) -> Path:
    """``<OBJECT>_<YYYY-MM-DD>_<OBSERVER>_CAL`` of the earliest light (of the folder and its
    subfolders; frames whose type or file name says calibration are not lights), beside the
    input folder."""
    from imgproc.fitsio import FitsError, read_header  # astropy only when this folder is needed

    earliest: tuple[str, str | None] | None = None
    for path in list_fits(input_dir):
        try:
            values = normalise(read_header(path)[0], keywords, path.name)
        except (FitsError, OSError):
            continue
        if values["imagetyp"] in (None, "light") and values["date_obs"]:
            key = (values["date_obs"], values["object"])
            earliest = key if earliest is None or key < earliest else earliest
    if earliest is None:
        raise UsageError(
            f"no light frame with a readable DATE-OBS in {input_dir}; give OUTPUT_DIR explicitly"
        )
    name = default_output_dirname(earliest[1], datetime.fromisoformat(earliest[0]), observer)
    return input_dir.parent / name


def resolve_config(
    args: argparse.Namespace, defaults: dict[str, Any], snakemake_config: Sequence[str] = ()
) -> dict[str, Any]:
    """The workflow config for these arguments (folders resolved and checked), with ``--set``'s
    and then Snakemake's ``--config`` overrides (:mod:`imgproc.overrides`), checked against the
    schema."""
    config = dict(defaults)
    input_dir = check_folder(args.input_dir, "input folder")
    if not list_fits(input_dir):
        raise UsageError(f"no FITS files (.fits .fit .fts .fz .fits.gz) in {input_dir} or its subfolders")
    given = (("bias", args.bias_dir), ("dark", args.dark_dir), ("flat", args.flat_dir))
    masters = {role: None if path is None else check_folder(path, f"{role} folder") for role, path in given}
    output = args.output_dir or default_output_dir(input_dir, args.observer, config["keywords"])
    output = output.resolve()
    conflict = output_conflict(output, input_dir, {r: f for r, f in masters.items() if f is not None})
    if conflict:
        raise UsageError(conflict)
    for role, folder in masters.items():
        if folder is not None and not list_fits(folder, [output]):
            raise UsageError(f"the {role} folder {folder} holds no FITS files (its subfolders neither)")
        config[f"{role}_dir"] = None if folder is None else str(folder)
    config.update(
        input_dir=str(input_dir), output_dir=str(output), observer=args.observer, filter=args.filter,
        bin=args.bin_level, align=args.align, stack=args.stack, stack_threshold=args.stack_threshold,
        verbose=args.verbose, object=args.object, clean=args.clean,
    )  # fmt: skip
    colour = config.setdefault("colour", {"output": "channels", "pattern": "auto"})
    colour.update({k: v for k, v in (("output", args.colour), ("pattern", args.cfa)) if v is not None})
    try:
        config = apply_overrides(config, [*args.overrides, *snakemake_config])
        check_config(config, workflow_dir() / "schemas" / "config.schema.yaml")
    except OverrideError as exc:
        raise UsageError(str(exc)) from None
    return config


def prepare_output(output: Path) -> None:
    """Create the output folder and check it is writable."""
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output folder {output}: {exc.strerror}") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise UsageError(f"the output folder {output} is not writable")


def write_config(output: Path, config: dict[str, Any]) -> Path:
    """Write the resolved config as ``imgproc.yaml`` (unchanged content keeps its file)."""
    path = output / CONFIG_NAME
    text = "# Resolved by imgproc; repeat with: snakemake --cores N --configfile " + str(path) + "\n"
    text += yaml.safe_dump(config, sort_keys=False)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def hold_run_lock(output: Path) -> Any:
    """Take the per-output-folder run lock, or fail if a live run holds it."""
    handle = open(output / ".imgproc.lock", "a+")  # noqa: SIM115  (held for the whole run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UsageError(f"another imgproc run is working in {output}; wait for it to finish") from None
    return handle


def live_snakemake_in(output: Path) -> bool:
    """True when a running Snakemake process works in ``output`` (its lock must be respected)."""
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (
                Path(os.readlink(entry / "cwd")) == output
                and b"snakemake" in (entry / "cmdline").read_bytes()
            ):
                return True
        except OSError:
            continue
    return False


def clear_stale_locks(output: Path) -> None:
    """Remove Snakemake locks left by a killed run; a live run's lock is kept."""
    locks = output / ".snakemake" / "locks"
    if not locks.is_dir() or not any(locks.iterdir()):
        return
    if live_snakemake_in(output):
        raise UsageError(f"a Snakemake run is working in {output}; wait for it to finish")
    for lock in locks.iterdir():
        lock.unlink(missing_ok=True)


def workflow_env(output: Path) -> dict[str, str]:
    """The environment of the Snakemake run: one thread per numeric library (ONE_THREAD_ENV)
    unless set, and the caches in ``output/.snakemake/cache`` (removed when the run ends).

    Snakemake keeps a copy of the workflow under ``$XDG_CACHE_HOME`` and astropy looks for its
    configuration under ``~``: with both pointed into the output folder, a run writes nothing
    outside it and works with a read-only or unreadable home folder (an astropy configuration
    of the user's own is read only when ``ASTROPY_CONFIG_DIR`` is set).
    """
    cache = output / ".snakemake" / "cache"
    (cache / "astropy-config").mkdir(parents=True, exist_ok=True)
    env = {**{key: "1" for key in ONE_THREAD_ENV}, **os.environ, "XDG_CACHE_HOME": str(cache)}
    env.setdefault("ASTROPY_CONFIG_DIR", str(cache / "astropy-config"))
    return env


class Stopped(Exception):
    """The run was stopped by a signal (Ctrl-C or SIGTERM) after its jobs were stopped."""

    def __init__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__("interrupted" if signum == signal.SIGINT else f"stopped by {name}")
        self.status = 128 + signum


def run_workflow(
    command: Sequence[str],
    output: Path,
    grace: float = STOP_SECONDS,
    say: Callable[[str], None] = print,
    verbose: bool = False,
) -> int:
    """Run Snakemake in ``output`` (environment: :func:`workflow_env`); its exit status. Its
    output goes to ``logs/snakemake.log``, and to ``say`` in full with ``verbose``, else only
    its warnings and errors (:func:`imgproc.console.relay`).

    Snakemake stays in this process's group, so Ctrl-C at the terminal (and ``kill -9`` of the
    group) reaches it directly: on SIGINT it stops its jobs. SIGTERM or SIGHUP sent to this
    process alone (a service manager, ``kill PID``, a closed terminal) is passed on as a SIGINT
    (Snakemake only waits for its running jobs on SIGTERM). Whatever still runs ``grace``
    seconds after a signal is killed. Then :class:`Stopped` is raised with 128 + the signal's
    number as the exit status (130, 143, 129), and the caller releases the run lock.
    """
    proc = subprocess.Popen(
        command, cwd=output, env=workflow_env(output),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
    )  # fmt: skip
    received: list[int] = []
    deadline = threading.Timer(grace, proc.kill)
    deadline.daemon = True

    def stop(signum: int, _frame: object) -> None:
        if not received:
            if signum != signal.SIGINT:  # a Ctrl-C reached Snakemake itself
                proc.send_signal(signal.SIGINT)
            deadline.start()
        received.append(signum)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, stop) for signum in handled}
    try:
        status = relay(proc, output / SNAKEMAKE_LOG, say, verbose)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        deadline.cancel()
        shutil.rmtree(output / ".snakemake" / "cache", ignore_errors=True)
    if received:
        raise Stopped(received[0])
    return status


def report_redone(notes: Sequence[str], shown: int = 5) -> None:
    """Say what earlier work is redone because it no longer holds (:func:`imgproc.verify.invalidate`)."""
    for note in notes[:shown]:
        print(f"imgproc: {note}", file=sys.stderr)
    if len(notes) > shown:
        print(f"imgproc: ... and {len(notes) - shown} more", file=sys.stderr)


def snakemake_command(config_path: Path, cores: int, extra: Sequence[str]) -> list[str]:
    """The Snakemake invocation for a resolved config."""
    return [
        sys.executable, "-m", "snakemake", "--snakefile", str(workflow_dir() / "Snakefile"),
        "--configfile", str(config_path), "--cores", str(cores), "--rerun-incomplete", "--keep-going",
        *extra,
    ]  # fmt: skip


def show_plan(output: Path) -> int:
    """Print the plan table, write it to ``plan.txt``; incomplete when a light will be skipped."""
    plan = read_tsv(output / "work" / "plan.tsv")
    manifest = read_tsv(output / "work" / "manifest.tsv")
    text = format_plan(plan, manifest)
    (output / "plan.txt").write_text(text, encoding="utf-8")
    print(text, end="")
    print(f"imgproc: plan written to {output / 'plan.txt'}; nothing was calibrated", file=sys.stderr)
    complete = all(row["status"] == "ok" for row in plan) and not any(
        row["status"] == "skipped" and row["folder"] == "light" for row in manifest
    )
    return EXIT_OK if complete else EXIT_INCOMPLETE


def report(output: Path, elapsed: float) -> int:
    """Print the first lines of ``summary.txt`` and where the outputs are; the exit status from
    ``summary.json``: failed when an output or light failed with an internal error, else
    complete or not."""
    try:
        summary = json.loads((output / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return EXIT_FAILED
    for line in summary_lines(output / "summary.txt"):
        print(line, file=sys.stderr)
    print(f"imgproc: finished in {elapsed:.1f} s; outputs in {output} (summary.txt, report.html)",
          file=sys.stderr)  # fmt: skip
    if summary.get("outputs_failed") or summary.get("failed_frames"):
        print(f"imgproc: internal errors; see {output / 'summary.txt'} and the tracebacks in {output}/logs",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    return EXIT_OK if summary.get("complete") else EXIT_INCOMPLETE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    ours, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(ours)
    try:
        defaults = yaml.safe_load((workflow_dir() / "config.yaml").read_text(encoding="utf-8"))
        snakemake_config, extra = take_snakemake_config(extra)
        config = resolve_config(args, defaults, snakemake_config)
        for gap in calibration_gaps([role for role in ("bias", "dark", "flat") if config[f"{role}_dir"]]):
            print(f"imgproc: warning: {gap}", file=sys.stderr)
        output = Path(config["output_dir"])
        prepare_output(output)
        lock = hold_run_lock(output)  # before any write: a live run's files stay as they are
        try:
            clear_stale_locks(output)
        except UsageError:
            lock.close()
            raise
        config_path = write_config(output, config)
        report_redone(invalidate(output, checksums=args.verify))
        freed = remove_scratch(output)
        if freed:
            print(f"imgproc: deleted the resampled frames a stopped stack left ({freed / 2**20:.0f} MiB)",
                  file=sys.stderr)  # fmt: skip
    except UsageError as exc:
        print(f"imgproc: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    targets = ["work/plan.tsv"] if args.plan else []
    dry = any(flag in extra for flag in PARTIAL_RUNS)
    started = time.monotonic()
    monitor = ProgressMonitor(output, interval=PROGRESS_SECONDS)
    watch = not (dry or args.plan)
    if watch:
        monitor.say(start_line(config, len(list_fits(Path(config["input_dir"]), [output]))))
        monitor.start()
    with lock:
        try:
            command = snakemake_command(config_path, args.concurrency, [*extra, *targets])
            status = run_workflow(command, output, say=monitor.say, verbose=args.verbose or dry)
        except Stopped as stop:
            print(f"imgproc: {stop}; run the same command again to finish {output}", file=sys.stderr)
            return stop.status
        finally:
            if watch:
                monitor.stop()
    if status != 0:
        print(f"imgproc: the workflow failed (Snakemake exit {status}); see {output / SNAKEMAKE_LOG}",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    if dry:
        return EXIT_OK
    problem = missing_filter(read_tsv(output / "work" / "manifest.tsv"), args.filter)
    if problem:
        print(f"imgproc: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.plan:
        return show_plan(output)
    outcome = report(output, time.monotonic() - started)
    if config["clean"] and outcome in (EXIT_OK, EXIT_INCOMPLETE):
        count, freed = clean_intermediates(output)
        print(f"imgproc: --clean: deleted {count} intermediates in work/cal ({freed / 2**20:.0f} MiB freed)",
              file=sys.stderr)  # fmt: skip
    return outcome


if __name__ == "__main__":
    sys.exit(main())
