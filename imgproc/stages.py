"""The pipeline as named stages: scan, plan, calibrate (a batch), publish (a batch), summarise.

Each stage reads and writes files under the output folder and is what one workflow rule runs.
Calibrate and publish skip work whose inputs are unchanged: every intermediate and output has a
stamp (a digest of its inputs' paths, sizes, modification and change times and of the settings),
and is checked against its recorded size and its DATASUM before it is reused (:mod:`imgproc.verify`), so a
rerun after a crash, or after adding frames, redoes only what changed.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgproc import __version__
from imgproc.calibrate import (
    HEADER_CARDS,
    MASTERS,
    ROLES,
    LightSettings,
    MasterCache,
    calibrate_frame,
)
from imgproc.colour import green, read_frame
from imgproc.fitsio import FitsError, Float32Rows, checksum_problem, write_atomic
from imgproc.keywords import normalise
from imgproc.limits import PREPARED_DIR, held_whole
from imgproc.manifest import FAILED, LISTED, OK, SKIPPED, read_tsv, shown, write_tsv
from imgproc.masterbuild import build_master
from imgproc.masters import COLUMNS as MASTER_COLUMNS
from imgproc.masters import plan_masters
from imgproc.plan import COLUMNS as PLAN_COLUMNS
from imgproc.plan import (
    PlanSettings,
    calibration_gaps,
    calibration_notes,
    colour_lights,
    colour_message,
    intermediate,
    make_plan,
    master_label,
)
from imgproc.progress import Progress
from imgproc.provenance import provenance_cards
from imgproc.quality import measure_frame
from imgproc.report import FRAME_THUMB_MAX, cached_thumbnail
from imgproc.scan import ScanRequest, scan
from imgproc.stamps import digest, file_id, read_json, receipt_items, write_json
from imgproc.stars import robust_background
from imgproc.timecards import VERSION as TIMECARDS_VERSION
from imgproc.timecards import airmass_problem
from imgproc.verify import file_record, is_transient, size_problem
from imgproc.workers import release_freed_memory

if TYPE_CHECKING:
    from astropy.io import fits

log = logging.getLogger("imgproc")
_HANDLERS_LOCK = threading.Lock()


@contextmanager
def job_logging(log_file: str | Path | None = None, verbose: bool = False) -> Iterator[None]:
    """Send the ``imgproc`` log records of the calling thread to stderr and to ``log_file``.

    Workflow jobs run as threads of the Snakemake process, several at once, so each job's
    handlers take only the records of its own thread. A failure is logged with its traceback
    before it propagates to Snakemake.
    """
    thread = threading.get_ident()
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w", encoding="utf-8"))
    formatter = logging.Formatter("%(levelname)s imgproc: %(message)s")
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.setLevel(logging.DEBUG if verbose else logging.INFO)
        handler.addFilter(lambda record: record.thread == thread)
    # The handler list is replaced, never changed in place: Logger.addHandler/removeHandler
    # mutate the list that another job's thread may be iterating, which skips a record there.
    with _HANDLERS_LOCK:
        log.handlers = [*log.handlers, *handlers]
        log.setLevel(logging.DEBUG)
    try:
        yield
    except Exception:
        log.exception("the job failed")
        raise
    finally:
        with _HANDLERS_LOCK:
            log.handlers = [handler for handler in log.handlers if handler not in handlers]
        for handler in handlers:
            handler.close()


def problem_item(exc: Exception, subject: str, what: str, inputs: Iterable[str | Path]) -> dict[str, str]:
    """Receipt item of ``subject`` (a light, an output) whose making raised ``exc``; the error is
    logged, with ``what`` failed (``calibration failed``) as the reason.

    A problem of its input files (a :class:`~imgproc.fitsio.FitsError`, which also covers an
    unusable master, or an OSError about one of ``inputs``) is ``skipped``; so is a passing fault
    of the machine (a full disk: :func:`imgproc.verify.is_transient`), marked ``retry`` so that the
    next run tries it again; anything else is an internal error: ``failed``, its traceback in the
    job log and its type in the reason.
    """
    if is_transient(exc):
        log.error("%s: %s: %s (tried again on the next run)", subject, what, exc)
        return {"status": SKIPPED, "retry": True, "reason": f"{what}: {exc} (tried again on the next run)"}
    about_input = isinstance(exc, OSError) and str(exc.filename) in {str(path) for path in inputs}
    if isinstance(exc, FitsError) or about_input:
        log.error("%s: %s: %s", shown(subject), what, exc)
        return {"status": SKIPPED, "reason": f"{what}: {exc}"}
    log.error("%s: %s: internal error", shown(subject), what, exc_info=exc)
    return {"status": FAILED, "reason": f"{what}: internal error {type(exc).__name__}: {exc}"}


# --- scan and plan ---------------------------------------------------------------------------


def run_scan(request: ScanRequest, manifest: Path, cache: Path, workers: int = 1) -> list[dict]:
    """Scan the folders into ``manifest``; unchanged files are taken from ``cache``."""
    previous = read_tsv(cache) if cache.exists() else []
    rows = scan(request, previous, workers)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    write_tsv(manifest, rows)
    write_tsv(cache, rows)
    for row in rows:
        if row["status"] == SKIPPED:
            log.warning("skipped %s: %s", shown(row["path"]), row["reason"])
    return rows


def run_plan(manifest: Path, plan_path: Path, masters_path: Path, settings: PlanSettings) -> list[dict]:
    """Write the masters to build (``work/masters.tsv``) and the plan of every light
    (``work/plan.tsv``) from the manifest."""
    rows = read_tsv(manifest)
    built = plan_masters(rows, settings.master_settings())
    plan = make_plan(rows, settings, built)
    write_tsv(masters_path, built, MASTER_COLUMNS)
    write_tsv(plan_path, plan, PLAN_COLUMNS)
    for master in built:
        if master["status"] != OK:
            log.warning("raw %s frames not combined: %s", master["role"], master["reason"])
    for entry in plan:
        if entry["status"] != OK:
            log.warning("skipped %s: %s", shown(entry["path"]), entry["reason"])
    for key, paths in sorted(colour_lights(plan).items()):
        log.info("%s", colour_message(*key, len(paths)))
    return plan


def run_build_master(master: Mapping[str, Any], target: Path, memory_budget: int) -> None:
    """Combine one planned master's raw frames into ``target``."""
    data, header = build_master(master, memory_budget)
    write_atomic(target, data, header)
    log.info("built %s from %d %s frames", target.name, master["n_frames"], master["role"])


# --- calibrate -------------------------------------------------------------------------------


def calibration_stamp(entry: Mapping[str, Any], observer: str, binning: int) -> str:
    """Digest of everything an intermediate depends on (a dark's scale only when it is scaled,
    so that the stamps of unscaled frames are those of earlier versions)."""
    masters = {role: file_id(entry[role]) for role in ROLES if entry.get(role)}
    scale = [entry["dark_scale"]] if entry.get("dark") and entry.get("dark_scale") is not None else []
    named = [f"object {entry['object_set']}"] if entry.get("object_set") else []
    cards = [entry["mid"], __version__, *scale, f"timecards {TIMECARDS_VERSION}", *named, HEADER_CARDS]
    if entry.get("cfa"):  # colour frames only
        cards += [f"cfa {entry['cfa']} {entry['channel']}"]
    return digest([file_id(entry["path"]), masters, observer, binning, *cards])


def frame_statistics(data: np.ndarray) -> dict[str, float]:
    """Sky level (median) and noise (1.4826 × MAD) of a calibrated frame, from about 16,000
    pixels on a regular grid (every 16th row and column of a 2048² frame)."""
    step = max(1, math.isqrt(data.size // 16384))
    sky, noise = robust_background(data[::step, ::step])
    return {"sky": round(sky, 4), "noise": round(noise, 4)}


def frame_diagnostics(entry: Mapping[str, Any], stats: Mapping[str, float]) -> str:
    """One line of per-frame diagnostics (``-v``): masters used, sky level and noise."""
    masters = " ".join(f"{role}={master_label(entry, role)}" for role in ROLES if entry.get(role))
    name = Path(entry["path"]).name
    return f"{name}: {masters or 'no masters'} sky={stats['sky']:.2f} noise={stats['noise']:.2f}"


def measured(data: np.ndarray | Float32Rows, header: fits.Header) -> dict[str, Any]:
    """The ``quality`` record of a calibrated frame (an RGB cube: its green plane; or a mono
    frame's rows on disk) and the ``stars`` it is made of, which registration matches
    (:func:`imgproc.quality.measure_frame`)."""
    image = green(data) if isinstance(data, np.ndarray) else data
    quality, stars = measure_frame(image, mosaic=bool(normalise(header)["bayerpat"]))
    return {"quality": quality.record(), "stars": stars.record()}


def calibrate_entry(entry: Mapping[str, Any], workdir: Path, cache: MasterCache, observer: str,
                    binning: int, quality: bool = False) -> dict[str, Any]:  # fmt: skip
    """Calibrate one light to its intermediate, unless an up-to-date one exists; its receipt item.

    With ``quality`` the frame's stars are measured too (:func:`measured`: the choice of a
    sequence's best reference frame, and its registration), kept beside the intermediate."""
    target = workdir.parent / intermediate(entry["frame_id"])
    stamp_path = target.with_suffix(".json")
    stamp = calibration_stamp(entry, observer, binning)
    previous = read_json(stamp_path) or {}
    if previous.get("stamp") == stamp:
        problem = size_problem(target, previous) or checksum_problem(target)
        if not problem:
            if quality and "stars" not in previous:  # calibrated by a run that did not measure
                data, header = read_frame(target)
                previous |= measured(data, header)
                write_json(stamp_path, previous)
            return {
                "status": "reused",
                "stamp": stamp,
                "no_airmass": previous.get("no_airmass", ""),
                "size": previous.get("size"),
            } | previous.get("stats", {})
        log.warning("%s: %s: calibrated again", entry["path"], problem)
    light = LightSettings(
        observer=observer, mid=datetime.fromisoformat(entry["mid"]), exptime=float(entry["exptime"]),
        binning=binning, dark_scale=entry.get("dark_scale") if entry.get("dark") else None,
        cfa=entry.get("cfa") or None, channel=entry.get("channel") or None,
        object_name=entry.get("object_set") or None, cards=provenance_cards(stamp, [entry["path"]]),
    )  # fmt: skip
    data, header = calibrate_frame(
        Path(entry["path"]), int(entry["hdu"]), {r: entry.get(r) for r in ROLES}, cache, target, light,
        prepared=workdir / PREPARED_DIR,
    )  # fmt: skip
    if entry.get("pub_kind") == "link" and entry.get("thumb"):  # the output is this very file
        cached_thumbnail(target, workdir / "thumbs", entry["output"], data, header, FRAME_THUMB_MAX)
    stats, no_airmass, size = frame_statistics(green(data)), airmass_problem(header), file_record(target)
    record = {"stamp": stamp, "source": entry["path"], "stats": stats, "no_airmass": no_airmass, **size}
    if quality:  # a frame too big to hold whole is measured from its file, a band at a time
        record |= measured(Float32Rows(target) if isinstance(data, np.memmap) else data, header)
    write_json(stamp_path, record)
    log.debug("%s", frame_diagnostics(entry, stats))
    return {"status": "calibrated", "stamp": stamp, "no_airmass": no_airmass, **stats, **size}


def run_calibrate_batch(
    entries: Sequence[Mapping[str, Any]],
    workdir: Path,
    receipt: Path,
    *,
    observer: str,
    binning: int,
    quality: bool = False,
) -> dict[str, dict]:
    """Calibrate the lights of one batch to their intermediates (``quality``: and measure the
    stars of those that are aligned, see :func:`calibrate_entry`); write the batch receipt."""
    results: dict[str, dict] = {}
    progress = Progress(f"calibrate {receipt.stem}", len(entries))
    for done, entry in enumerate(entries, start=1):
        try:
            # aligned frames; a colour light's channel frames are registered by its green one
            measure = (
                quality
                and bool(entry.get("reference"))
                and entry.get("measure") in (None, "", entry["frame_id"])
            )
            results[entry["frame_id"]] = calibrate_entry(entry, workdir, MASTERS, observer, binning, measure)
        except Exception as exc:  # one frame's error, whatever it is, must not stop the batch
            inputs = [entry["path"], *(entry[role] for role in ROLES if entry.get(role))]
            results[entry["frame_id"]] = problem_item(exc, entry["path"], "calibration failed", inputs)
        if not held_whole((entry["ny"], entry["nx"])):  # a 61-MP frame's freed memory goes back
            release_freed_memory()
        progress.step(done)
    write_json(receipt, {"kind": "calibrate", "items": results, "seconds": progress.elapsed()})
    return results


# --- summary ---------------------------------------------------------------------------------


def summarise(
    manifest: Sequence[Mapping[str, Any]],
    plan: Sequence[Mapping[str, Any]],
    receipts: Sequence[Mapping[str, Any]],
    masters: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Counts and reasons of a run: what was written, stacked, listed, skipped (a problem of the
    input) and failed (an internal error), and what was not done to the lights."""
    calibrated, outputs = receipt_items(receipts)
    by_id = {e["frame_id"]: e for e in plan}
    failed_frames = [
        {"file": by_id[fid]["path"], "reason": item["reason"]}
        for fid, item in calibrated.items()
        if item["status"] == FAILED and fid in by_id
    ]
    skipped = [
        {"file": row["path"], "reason": row["reason"]}
        for row in manifest
        if row["status"] == SKIPPED and row["folder"] == "light"
    ]
    reasons: dict[str, list[str]] = {}  # a colour light's channel frames: one line, their reasons
    for entry in plan:
        if entry["status"] != OK and entry["reason"] not in reasons.setdefault(entry["path"], []):
            reasons[entry["path"]].append(entry["reason"])
    skipped += [{"file": path, "reason": "; ".join(why)} for path, why in reasons.items() if why]
    skipped += [
        {"file": by_id[fid]["path"], "reason": item["reason"]}
        for fid, item in calibrated.items()
        if item["status"] == SKIPPED and fid in by_id
    ]
    for item in outputs.values():
        skipped += [
            {"file": by_id[fid]["path"], "reason": reason}
            for fid, reason in item.get("excluded", {}).items()
            if fid in by_id and not any(s["file"] == by_id[fid]["path"] for s in skipped + failed_frames)
        ]
    written = sorted(name for name, item in outputs.items() if item["status"] not in (SKIPPED, FAILED))
    not_written = {
        status: {n: i["reason"] for n, i in sorted(outputs.items()) if i["status"] == status}
        for status in (SKIPPED, FAILED)
    }
    roles = {row["folder"] for row in manifest} - {"light"}
    return {
        "version": __version__,
        "lights": sum(1 for row in manifest if row["folder"] == "light" and row["role"] == "light"),
        "outputs": len(written),
        "stacked": sum(1 for name in written if outputs[name].get("ncombine", 1) > 1),
        "output_files": written,
        "outputs_failed": len(not_written[FAILED]),
        "failed_outputs": not_written[FAILED],
        "skipped_outputs": not_written[SKIPPED],
        "failed_frames": sorted(failed_frames, key=lambda s: s["file"]),
        "skipped": sorted(skipped, key=lambda s: s["file"]),
        "listed": [
            {"file": row["path"], "reason": row["reason"]} for row in manifest if row["status"] == LISTED
        ],
        "masters_skipped": [
            {"file": row["path"], "reason": row["reason"]}
            for row in manifest
            if row["status"] == SKIPPED and row["folder"] != "light"
        ],
        "uncalibrated": not roles,
        "steps_not_done": calibration_gaps(roles),
        "colour": [
            {"file": path, "bayerpat": pattern, "channels": channels}
            for (pattern, channels), paths in sorted(colour_lights(plan).items())
            for path in paths
        ],
        "masters_built": [m["path"] for m in masters if m["status"] == OK],
        "masters_not_built": [
            {"role": m["role"], "frames": m["members"].split(";"), "reason": m["reason"]}
            for m in masters
            if m["status"] != OK
        ],
        "complete": not skipped and not failed_frames and not any(not_written.values()),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as lines for a person."""
    frames_failed = len(summary["failed_frames"])
    lines = [
        f"imgproc {summary['version']}: {summary['lights']} lights, {summary['outputs']} outputs written "
        f"({summary['stacked']} stacked), {summary['outputs_failed']} outputs failed, "
        + (f"{frames_failed} lights failed, " if frames_failed else "")
        + f"{len(summary['skipped'])} lights skipped, "
        f"{len(summary['listed'])} files listed but not processed"
    ]
    lines += [
        f"  output {n} FAILED: {r} (traceback in logs/publish/)" for n, r in summary["failed_outputs"].items()
    ]
    lines += [f"  light {shown(s['file'])} FAILED: {s['reason']} (traceback in logs/calibrate/)"
              for s in summary["failed_frames"]]  # fmt: skip
    lines += [f"  skipped {shown(s['file'])}: {s['reason']}" for s in summary["skipped"]]
    lines += [f"  output {n} not written: {r}" for n, r in summary["skipped_outputs"].items()]
    lines += [f"  {note}" for note in calibration_notes(summary)]
    lines += [f"  master {shown(s['file'])} not used: {s['reason']}" for s in summary["masters_skipped"]]
    lines += [f"  built master {path}" for path in summary["masters_built"]]
    for m in summary["masters_not_built"]:
        frames = ", ".join(shown(Path(f).name) for f in m["frames"])
        lines.append(f"  raw {m['role']} frames {frames} not combined: {m['reason']}")
    lines += [f"  listed {shown(s['file'])}: {s['reason']}" for s in summary["listed"]]
    if summary.get("superseded"):
        lines.append(
            f"  {len(summary['superseded'])} outputs of earlier settings are in {SUPERSEDED}/ "
            "(made from these lights with another -S, -s or -b; delete the folder when not needed)"
        )
    if summary["outputs_failed"] or frames_failed:
        lines.append("FAILED: internal errors (see above and the tracebacks in logs/)")
    else:
        lines.append(
            "complete: every light was processed" if summary["complete"] else "INCOMPLETE: see above"
        )
    return "\n".join(lines) + "\n"


def airmass_gaps(
    receipts: Sequence[Mapping[str, Any]], plan: Sequence[Mapping[str, Any]] = ()
) -> dict[str, int]:
    """Why AIRMASS could not be written (no target coordinates or no site in the header), with
    the number of lights for each reason (a colour light's channel frames, by the ``plan``,
    count once)."""
    calibrated, _ = receipt_items(receipts)
    light = {entry["frame_id"]: entry["path"] for entry in plan}
    found = {
        (light.get(fid, fid), item["no_airmass"])
        for fid, item in calibrated.items()
        if item.get("no_airmass")
    }
    return dict(sorted(Counter(reason for _, reason in found).items()))


#: Where outputs of settings no longer in force are moved (:func:`supersede_outputs`).
SUPERSEDED = "superseded"


def supersede_outputs(outdir: Path, plan: Sequence[Mapping[str, Any]]) -> list[str]:
    """Move aside the outputs that earlier runs made from lights the plan now makes into other
    outputs (another ``-S``, ``-s`` or ``-b``): into ``outdir/superseded/``, with their
    publishing stamps removed. Outputs of lights not in this plan (another ``-f``, lights
    taken away) stay, and so does any file imgproc did not make. Returns the names moved."""
    current = {str(entry["output"]) for entry in plan if entry.get("output")}
    lights = {str(entry["path"]) for entry in plan}
    moved = []
    for stamp_path in sorted((outdir / "work" / "pub").glob("*.json")):
        name, stamp = stamp_path.stem, read_json(stamp_path) or {}
        sources = stamp.get("sources") or []
        target = outdir / name
        if name in current or not sources or not set(sources) <= lights:
            continue
        if target.exists() and not size_problem(target, stamp):
            (outdir / SUPERSEDED).mkdir(exist_ok=True)
            target.replace(outdir / SUPERSEDED / name)
            moved.append(name)
            log.warning("%s: made from these lights with other settings; moved to %s/", name, SUPERSEDED)
        stamp_path.unlink()
    return moved


def run_summary(
    manifest: Path, plan: Path, masters: Path, receipts: Sequence[Path], out_json: Path, out_text: Path
) -> dict:
    """Write ``summary.json`` and ``summary.txt`` from the manifest, plan, masters and receipts,
    after moving aside the outputs of settings no longer in force (:func:`supersede_outputs`).

    Both say what was done, never how long it took: two runs of the same night give the same
    bytes. The batch jobs' time goes to the log.
    """
    receipts_data = [read_json(p) or {} for p in receipts]
    plan_rows = read_tsv(plan)
    supersede_outputs(out_json.parent, plan_rows)
    summary = summarise(read_tsv(manifest), plan_rows, receipts_data, read_tsv(masters))
    summary["no_airmass"] = airmass_gaps(receipts_data, plan_rows)
    superseded = out_json.parent / SUPERSEDED
    summary["superseded"] = sorted(p.name for p in superseded.iterdir()) if superseded.is_dir() else []
    write_json(out_json, summary)
    text = format_summary(summary)
    out_text.write_text(text, encoding="utf-8")
    seconds = sum(float(r.get("seconds", 0.0)) for r in receipts_data)
    log.info("%s\n%.1f s of calibrate and publish work", text.rstrip(), seconds)
    return summary
