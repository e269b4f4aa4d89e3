"""What the ``imgproc`` command prints while Snakemake works.

Snakemake's own log (every job started and finished, the jobs' INFO lines) goes to
``OUTPUT_DIR/logs/snakemake.log``, and to the terminal too with ``-v``. Without ``-v`` only its
warnings and errors are shown, as they happen (at most :data:`NOTICES_MAX`; the rest are in the
log), between the progress lines of :class:`imgproc.progress.ProgressMonitor`.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

#: Snakemake's log of a run, relative to the output folder (the latest run's).
SNAKEMAKE_LOG = Path("logs") / "snakemake.log"
#: Warnings and errors shown on the terminal without ``-v``; the rest are only in the log.
NOTICES_MAX = 10
#: A job's progress, and the indented lines of Snakemake's job descriptions (``    reason: Params
#: have changed ...`` quotes the manifest's columns, one of which is ``error``).
_QUIET = re.compile(r"^(INFO|DEBUG) imgproc: |^\s+[a-z_]+: ")
_JOB_LEVEL = re.compile(r"^(WARNING|ERROR|CRITICAL) imgproc: ")
_NOTEWORTHY = re.compile(
    r"^(WARNING|ERROR|CRITICAL) imgproc: |\b(errors?|exception|warnings?)\b"
    r"|^SLURM run ID|^Nothing to be done",
    re.I,
)


def noteworthy(line: str) -> bool:
    """Whether a line of Snakemake's log is a warning or an error (a job's ``WARNING imgproc:``
    line, Snakemake's ``Error in rule ...``), the SLURM run ID (``scancel --name`` takes it) or
    ``Nothing to be done``, not a job's progress."""
    return not _QUIET.match(line) and _NOTEWORTHY.search(line) is not None


def relay(
    process: subprocess.Popen[str], log_path: Path, say: Callable[[str], None], verbose: bool = False
) -> int:
    """Write every line ``process`` (Snakemake, its stderr joined to its stdout) prints to
    ``log_path``, and pass it to ``say`` with ``verbose``, else only the noteworthy ones (at most
    :data:`NOTICES_MAX`); returns its exit status once it has ended."""
    assert process.stdout is not None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    shown = 0
    with open(log_path, "w", encoding="utf-8") as log:
        for line in process.stdout:
            log.write(line)
            log.flush()
            text = line.rstrip("\n")
            if verbose:
                say(text)
            elif noteworthy(text):
                shown += 1
                if shown <= NOTICES_MAX:
                    say(_JOB_LEVEL.sub(lambda m: f"imgproc: {m[1].lower()}: ", text))
                elif shown == NOTICES_MAX + 1:
                    say(f"imgproc: more warnings and errors in {log_path}")
    return process.wait()


def start_line(config: Mapping[str, object], files: int) -> str:
    """The one line the command prints before the run: what will be done, and where."""
    steps = [role for role in ("bias", "dark", "flat") if config.get(f"{role}_dir")]
    work = [f"calibrate ({', '.join(steps)})" if steps else "no calibration"]
    if config.get("bin", 1) != 1:
        work.append(f"bin {config['bin']}x{config['bin']}")
    if config.get("align"):
        work.append("align")
    if config.get("stack"):
        work.append(f"stack sequences of more than {config['stack_threshold']} frames")
    return (
        f"imgproc: {files} FITS files in {config['input_dir']}: {', '.join(work)} -> {config['output_dir']} "
        f"(Snakemake's log: {config['output_dir']}/{SNAKEMAKE_LOG})"
    )


def summary_lines(summary_txt: Path, limit: int = 6) -> list[str]:
    """The first lines of ``summary.txt`` (``limit`` at most, the last saying how many more
    there are), to print at the end of a run."""
    try:
        lines = summary_txt.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    if len(lines) <= limit:
        return lines
    return [*lines[: limit - 1], f"  ... {len(lines) - limit + 1} more lines in {summary_txt}"]
