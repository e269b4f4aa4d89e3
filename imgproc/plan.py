"""The plan: from manifest rows to what each light becomes.

For every light: its masters (or why none matched), its sequence, its stack group and output
name, the calibrate batch that makes its intermediate file and the publish batch that makes its
final output.  Pure Python (no astropy) so that the Snakefile can read it cheaply.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter, defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from imgproc.keywords import CHANNEL_FILTERS, MODE_CHANNELS
from imgproc.manifest import OK, SKIPPED, shown
from imgproc.masters import MasterSettings, plan_masters
from imgproc.matching import DEFAULT_CRITERIA, DEFAULT_TOLERANCE, match_light
from imgproc.naming import mean_time, mid_exposure, output_name, safe_part

#: Plan columns, in order.
COLUMNS = (
    "frame_id", "path", "size", "mtime_ns", "ctime_ns", "hdu", "status", "reason", "sequence", "reference",
    "output", "n_group", "mid", "exptime", "bias", "dark", "dark_scale", "flat", "cal_batch", "pub_batch",
    "pub_kind", "thumb", "pierside", "ny", "nx", "cfa", "channel", "measure", "object_set",
)  # fmt: skip
#: Largest binning factor (``-b``; the config schema's ``bin`` maximum).
MAX_BIN = 64
#: Lone calibrated frames with a thumbnail in the report: at most this many, evenly spread over
#: the night (every stack and aligned frame has one).
REPORT_FRAMES = 48
#: Pixels of one unit of batch work (:func:`frame_work`): a 2048² frame.
UNIT_PIXELS = 2048 * 2048
#: Outputs that align or stack are spread over up to this many times ``batches`` publish jobs.
HEAVY_JOBS = 4
WORK = Path("work")


@dataclass
class PlanSettings:
    """What the plan depends on besides the manifest."""

    observer: str = "DGAH"
    object_name: str | None = None  # --object: OBJECT of lights whose header has none
    stack: bool = False
    stack_threshold: int = 150
    binning: int = 1  # -b: a light smaller than one binned pixel is skipped
    align: bool = False
    reference: str = "first"  # first | middle
    roles: Sequence[str] | None = None  # master folders given (None: those seen in the manifest)
    batches: int = 16  # target number of calibrate/publish batches
    min_batch: int = 8  # fewest frames (or outputs) in one batch, so job start-up stays small
    max_batch: int = 100  # most frames (or outputs) in one batch
    criteria: Mapping[str, Sequence[str]] = field(default_factory=lambda: dict(DEFAULT_CRITERIA))
    tolerance: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TOLERANCE))
    min_master_frames: int = 3  # raw calibration frames needed to build a master
    prefer_finished: bool = True  # a finished master covering a group wins over building one
    dark_scaling: bool = True  # no dark of a frame's exposure: a longer one scaled (needs a bias)
    colour_output: str = "channels"  # what a colour light becomes: channels | green | rgb | mosaic
    cfa: str = "auto"  # auto (the manifest's pattern) | none (all mono) | a pattern for every light

    def master_settings(self) -> MasterSettings:
        """How raw calibration frames become masters."""
        return MasterSettings(
            self.min_master_frames, self.prefer_finished, self.criteria, self.tolerance, self.dark_scaling
        )


def frame_id(path: str) -> str:
    """Stable, file-name-safe id of a light: its name stem plus a digest of its full path."""
    stem = Path(path).name.split(".")[0]
    return f"{safe_part(stem, 'frame')[:40]}-{hashlib.sha1(os.fsencode(path)).hexdigest()[:8]}"


def intermediate(fid: str) -> Path:
    """Where the calibrated intermediate file of a light lives (relative to the output folder)."""
    return WORK / "cal" / f"{fid}.fits"


def stack_groups(n_frames: int, threshold: int) -> list[list[int]]:
    """Group frame indices for sub-stacking.

    Seed rule: if ``n_frames > threshold``, consecutive frames are grouped
    ``k = round(n_frames / threshold)`` at a time (Python ``round``, so halves go to the even
    integer; the last group may be smaller); otherwise every frame is its own group.
    """
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    k = round(n_frames / threshold) if n_frames > threshold else 1
    return [list(range(start, min(start + k, n_frames))) for start in range(0, n_frames, k)]


def sequence_key(light: Mapping[str, Any]) -> str:
    """Name of the sequence of a light: OBJECT, FILTER, EXPTIME and binning."""
    exptime = f"{light['exptime']:g}s"
    return "_".join(
        (safe_part(light["object"]), safe_part(light["filter"]), exptime,
         f"{light['xbinning']}x{light['ybinning']}")
    )  # fmt: skip


def frame_work(entry: Mapping[str, Any]) -> float:
    """Work of calibrating (or publishing) one light, in frames of :data:`UNIT_PIXELS`: a
    61-megapixel frame is 14.6 units, anything of 2048² pixels or fewer is 1 (its job's fixed
    costs dominate)."""
    return max(1.0, int(entry["ny"]) * int(entry["nx"]) / UNIT_PIXELS)


def cut_batches(work: Sequence[float], jobs: int, smallest: int, largest: int) -> list[int]:
    """Batch index of each item of ``work`` (in order): consecutive items in up to ``jobs``
    batches of equal work, each of about ``smallest`` units of work or more (fewer, larger jobs
    for a small night) and at most ``largest`` units and ``largest`` items. An item heavier than
    a batch's share is a batch of its own, so ten 61-megapixel frames are ten jobs that the cores
    share evenly, where ten small frames are one.

    The number of batches is rounded down to a multiple of 4 (of 2, below 4), so that 2 or 4
    cores run them in full rounds, and the work is spread evenly over them: 40 frames are 4
    batches of 10, not 5 of 8 whose last one runs alone."""
    total = sum(work)
    count = max(1, min(jobs, math.floor(total / max(1, smallest) + 1e-9)))
    if count > 1:
        count -= count % (4 if count >= 4 else 2)
    share = max(1, min(largest, math.ceil(total / count - 1e-9)))
    return _cut(work, share, largest)


def _cut(work: Sequence[float], share: float, largest: int) -> list[int]:
    """Batch index of each item: a new batch when ``share`` or ``largest`` items are reached."""
    batches: list[int] = []
    index, load, count = 0, 0.0, 0
    for units in work:
        if count and (load + units > share + 1e-9 or count >= largest):
            index, load, count = index + 1, 0.0, 0
        batches.append(index)
        load, count = load + units, count + 1
    return batches


def make_plan(
    rows: Sequence[Mapping[str, Any]],
    settings: PlanSettings,
    built: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Plan rows for every light of the manifest (skipped ones with their reason).

    Lights are matched against the finished masters of the manifest and the masters ``built``
    from raw calibration frames (:func:`imgproc.masters.plan_masters`, computed when not given).
    """
    if built is None:
        built = plan_masters(rows, settings.master_settings())
    masters: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in [*rows, *built]:
        if row["folder"] != "light" and row["status"] == OK and row["is_master"]:
            masters[row["folder"]].append(row)
    roles = settings.roles
    if roles is None:
        roles = sorted({row["folder"] for row in rows} - {"light"})
    wanted = {role: masters.get(role, []) for role in roles}
    plan: list[dict[str, Any]] = []
    for row in rows:
        if row["folder"] != "light" or row["role"] != "light" or row["status"] != OK:
            continue
        object_set = settings.object_name if not row["object"] else None
        if object_set:
            row = {**row, "object": object_set}
        entry = {
            "frame_id": frame_id(row["path"]), "path": row["path"], "size": row["size"],
            "mtime_ns": row["mtime_ns"], "ctime_ns": row.get("ctime_ns"), "hdu": row["hdu"],
            "status": OK, "reason": "", "pierside": row.get("pierside"), "ny": row["ny"], "nx": row["nx"],
            "sequence": sequence_key(row),
            "mid": mid_exposure(datetime.fromisoformat(row["date_obs"]), row["exptime"]),
            "exptime": row["exptime"], "object_set": object_set or "",
        }  # fmt: skip
        matches = match_light(row, wanted, settings.criteria, settings.tolerance, settings.dark_scaling)
        for role, match in matches.items():
            entry[role] = match.path
        entry["dark_scale"] = matches["dark"].scale if "dark" in matches else None
        failed = [match.reason for match in matches.values() if match.path is None]
        if min(row["ny"], row["nx"]) < settings.binning:
            failed.append(
                f"the frame ({row['nx']}x{row['ny']} px) is smaller than the binning "
                f"{settings.binning}x{settings.binning} (-b)"
            )
        if failed:
            entry.update(status=SKIPPED, reason="; ".join(failed))
        entry["_row"] = row
        cfa = light_cfa(row, settings.cfa)
        plan += colour_entries(entry, cfa, settings) if cfa else [entry]
    _group(plan, settings)
    _assign_batches(plan, settings)
    _mark_thumbnails(plan)
    for entry in plan:
        entry.pop("_row")
        entry["mid"] = entry["mid"].isoformat(timespec="microseconds")
    return sorted(plan, key=lambda entry: (entry["status"] != OK, entry["mid"], entry["path"]))


def light_cfa(row: Mapping[str, Any], forced: str = "auto") -> str | None:
    """A light's CFA pattern as stored: the manifest's (``forced`` ``auto``), none (``none``) or
    the ``forced`` pattern."""
    if forced == "auto":
        return row.get("bayerpat") or None
    return None if forced == "none" else forced


def colour_entries(entry: dict[str, Any], cfa: str, settings: PlanSettings) -> list[dict[str, Any]]:
    """The plan entries of a colour light: one per channel of ``settings.colour_output``, each
    with its own frame id, FILTER (``TR``, ``TG``, ``TB``, ``RGB``; the mosaic keeps its own) and
    so its own sequence; ``measure`` names the entry whose image registration measures (the
    light's green channel frame; an RGB cube measures its own green plane)."""
    mode, base = settings.colour_output, entry["frame_id"]
    channels = MODE_CHANNELS[mode]
    factor = settings.binning
    problem = ""
    if mode == "mosaic" and factor > 1:
        problem = f"a raw mosaic is not binned (-b {factor} would mix colours): use colour output channels"
    elif mode in ("channels", "green") and factor > 1 and factor % 2:
        problem = f"colour frames bin whole 2x2 CFA cells: -b {factor} is odd (use 1, 2, 4...)"
    elif mode in ("channels", "green") and min(entry["ny"], entry["nx"]) < max(2, factor):
        problem = f"the frame ({entry['nx']}x{entry['ny']} px) is smaller than one 2x2 CFA cell"
    out = []
    for channel in channels:
        row = dict(entry["_row"])
        if channel != "M":
            row["filter"] = CHANNEL_FILTERS.get(channel, channel)
        suffix = "" if channel == "M" else f"-{row['filter']}"
        green = f"{base}-TG" if "G" in channels else ""
        item = dict(entry, frame_id=base + suffix, cfa=cfa, channel=channel, measure=green, _row=row,
                    sequence=sequence_key(row))  # fmt: skip
        if problem and item["status"] == OK:
            item.update(status=SKIPPED, reason=problem)
        out.append(item)
    return out


def _split_by_shape(plan: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The plan's good entries by sequence. Frames of one sequence key but of different image
    shapes (crops, a changed readout area) cannot be aligned or stacked together: each shape is
    a sequence of its own, its name ending in the shape (``..._700x700px``)."""
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in plan:
        if entry["status"] == OK:
            by_key[entry["sequence"]].append(entry)
    sequences: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for key, entries in by_key.items():
        several = len({(e["ny"], e["nx"]) for e in entries}) > 1
        for entry in entries:
            if several:
                entry["sequence"] = f"{key}_{entry['nx']}x{entry['ny']}px"
            sequences[entry["sequence"]].append(entry)
    return sequences


def _group(plan: list[dict[str, Any]], settings: PlanSettings) -> None:
    sequences = _split_by_shape(plan)
    claimed: dict[str, str] = {}
    for key in sorted(sequences):
        frames = sorted(sequences[key], key=lambda entry: (entry["mid"], entry["path"]))
        threshold = settings.stack_threshold if settings.stack else len(frames)
        groups = stack_groups(len(frames), threshold)
        mosaic = frames[0].get("channel") == "M"
        if mosaic and settings.align:  # a mosaic is never resampled: each light its own output
            groups = [[index] for index in range(len(frames))]
        for members in groups:
            group = [frames[i] for i in members]
            first = group[0]["_row"]
            name = output_name(
                first["object"],
                settings.observer,
                first["filter"],
                mean_time([entry["mid"] for entry in group]),
            )
            owner = claimed.setdefault(name, group[0]["path"])
            kind = "stack" if len(group) > 1 else "align" if settings.align and not mosaic else "link"
            for entry in group:
                entry.update(output=name, n_group=len(group), pub_kind=kind)
                if owner != group[0]["path"]:
                    entry.update(
                        status=SKIPPED,
                        output="",
                        reason=f"output name {name} is already made from {Path(owner).name}",
                    )
        # the reference is one of the frames still planned (not one whose name clashed)
        kept = [entry for entry in frames if entry["status"] == OK] or frames
        ref = kept[len(kept) // 2 if settings.reference == "middle" else 0]
        # a colour channel frame is registered by its light's green frame
        reference = (ref.get("measure") or ref["frame_id"]) if settings.align and not mosaic else ""
        for entry in frames:
            entry["reference"] = reference


def _assign_batches(plan: list[dict[str, Any]], settings: PlanSettings) -> None:
    ok = sorted((entry for entry in plan if entry["status"] == OK), key=lambda e: (e["sequence"], e["mid"]))
    cal = cut_batches([frame_work(e) for e in ok], settings.batches, settings.min_batch, settings.max_batch)
    for entry, index in zip(ok, cal, strict=True):
        entry["cal_batch"] = f"c{index:04d}"
    work: dict[str, float] = defaultdict(float)  # outputs that align or stack: their frames' work
    for entry in ok:
        if entry["pub_kind"] != "link":
            work[entry["output"]] += frame_work(entry)
    # aligning or stacking is heavy per output: up to 4 x `batches` jobs, so the night's last
    # job (which may run alone on a core) is short
    heavy = cut_batches(list(work.values()), HEAVY_JOBS * settings.batches, 1, settings.max_batch)
    pub = dict(zip(work, heavy, strict=True))
    first = max(pub.values(), default=-1) + 1
    # Publishing a lone unaligned frame is a hard link: each calibrate batch's links are one
    # publish batch, which runs as soon as those frames are calibrated, not after the night.
    links = [entry for entry in ok if entry["pub_kind"] == "link"]
    link_batches = {batch: first + i for i, batch in enumerate(sorted({e["cal_batch"] for e in links}))}
    pub |= {entry["output"]: link_batches[entry["cal_batch"]] for entry in links}
    for entry in ok:
        entry["pub_batch"] = f"p{pub[entry['output']]:04d}"


def _mark_thumbnails(plan: list[dict[str, Any]]) -> None:
    """``thumb``: whether the output gets a thumbnail (and star statistics) in the report. A
    night may have thousands of lone frames; every k-th of them, in time order, is enough to
    see it, and the rest cost neither the thumbnail's time nor the report's size."""
    ok = sorted((e for e in plan if e["status"] == OK), key=lambda e: (e["mid"], e["path"]))
    links = [e for e in ok if e["pub_kind"] == "link"]
    for entry in ok:
        entry["thumb"] = entry["pub_kind"] != "link"
    for entry in links[:: max(1, math.ceil(len(links) / REPORT_FRAMES))]:
        entry["thumb"] = True


def master_label(entry: Mapping[str, Any], role: str) -> str:
    """File name of the master of ``role`` a plan entry uses, a scaled dark with its factor
    (``master_dark_300s.fits ×0.1``); ``-`` for none."""
    if not entry.get(role):
        return "-"
    name = Path(entry[role]).name
    scale = entry.get("dark_scale") if role == "dark" else None
    return name if scale is None else f"{name} ×{scale:.4g}"


def _short_names(paths: Sequence[str]) -> dict[str, str]:
    """Each path below the folder that holds them all (the file name in a flat folder), as
    messages show it (:func:`imgproc.manifest.shown`)."""
    if not paths:
        return {}
    common = os.path.commonpath([os.path.dirname(path) for path in paths]) or "."
    return {path: shown(os.path.relpath(path, common)) for path in paths}


#: What is not done to the lights when a master folder is not given, by role.
STEPS_NOT_DONE = {
    "bias": "no bias folder given (-B): bias not subtracted",
    "dark": "no dark folder given (-D): darks not subtracted",
    "flat": "no flat folder given (-F): not flat-fielded",
}
UNCALIBRATED = (
    "no master folder given (-B/-D/-F): the outputs are uncalibrated (bias, dark and flat not applied)"
)


def calibration_gaps(roles: Collection[str]) -> list[str]:
    """What is not done to the lights with master folders of only these ``roles`` given: one line
    when none is given, else a line per missing folder."""
    missing = [role for role in STEPS_NOT_DONE if role not in roles]
    return [UNCALIBRATED] if len(missing) == len(STEPS_NOT_DONE) else [STEPS_NOT_DONE[r] for r in missing]


def colour_lights(plan: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[str]]:
    """Planned colour lights (plan ``cfa``) by (CFA pattern as stored, their channels joined by
    ``+``): their paths."""
    channels: dict[str, set[str]] = defaultdict(set)
    patterns: dict[str, str] = {}
    for entry in plan:
        if entry["status"] == OK and entry.get("cfa"):
            channels[str(entry["path"])].add(str(entry["channel"]))
            patterns[str(entry["path"])] = str(entry["cfa"])
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(channels):
        found[(patterns[path], "+".join(sorted(channels[path])))].append(path)
    return dict(found)


#: What a colour light becomes, by its plan channels.
COLOUR_OUTPUTS = {
    "B+G+R": "TR, TG and TB channel frames of 2x2 CFA cells (super-pixels)",
    "G": "TG (green) channel frames of 2x2 CFA cells (super-pixels)",
    "RGB": "RGB cubes, bilinear debayered",
    "M": "calibrated mosaics, not debayered, binned or resampled",
}


def colour_message(pattern: str, channels: str, count: int) -> str:
    """The report of ``count`` colour lights of CFA ``pattern`` made into ``channels`` (plan
    channels joined by ``+``)."""
    made = COLOUR_OUTPUTS.get(channels, channels)
    return f"{count} colour lights (CFA {pattern} as stored) -> {made}"


def calibration_notes(summary: Mapping[str, Any]) -> list[str]:
    """What a run's summary says was not done to its lights: calibration steps without a master
    folder, what colour lights became (a line per CFA pattern and output), and AIRMASS not
    written (a line per reason)."""
    colour = Counter((c["bayerpat"], c["channels"]) for c in summary.get("colour") or [])
    notes = list(summary.get("steps_not_done") or [])
    notes += [colour_message(pattern, channels, n) for (pattern, channels), n in sorted(colour.items())]
    return notes + [
        f"no AIRMASS in {n} lights: {why}" for why, n in (summary.get("no_airmass") or {}).items()
    ]


def object_notes(plan: Sequence[Mapping[str, Any]]) -> list[str]:
    """Which name the lights without OBJECT got: ``--object``'s (a header's own OBJECT wins), or
    UNKNOWN."""
    named = Counter(entry["object_set"] for entry in plan if entry.get("object_set"))
    unknown = sum(1 for e in plan if e["status"] == OK and (e["sequence"] or "").startswith("UNKNOWN_"))
    notes = [
        f"{n} lights without OBJECT named {name!r} (--object); lights with OBJECT keep their own"
        for name, n in sorted(named.items())
    ]
    if unknown:
        notes.append(f"{unknown} lights without OBJECT named UNKNOWN: give --object NAME to name them")
    return notes


def format_plan(plan: Sequence[Mapping[str, Any]], manifest: Sequence[Mapping[str, Any]]) -> str:
    """The plan as a table for a person: each light's sequence, group, masters and output, or why
    it will be skipped; then the files that are only listed (calibration frames among the lights,
    other filters) or skipped. Files are named by their path below the light folder."""
    header = ("light", "sequence", "group", "bias", "dark", "flat", "output / reason")
    others = [row for row in manifest if row["folder"] == "light" and row["status"] != OK]
    names = _short_names([entry["path"] for entry in plan] + [row["path"] for row in others])
    rows = []
    for entry in sorted(plan, key=lambda e: (e["sequence"] or "", e["mid"] or "", e["path"])):
        masters = [master_label(entry, role) for role in ("bias", "dark", "flat")]
        outcome = entry["output"] if entry["status"] == OK else f"SKIPPED: {entry['reason']}"
        group = f"{entry['n_group']} frames" if (entry.get("n_group") or 1) > 1 else "single"
        rows.append((names[entry["path"]], entry["sequence"] or "-", group, *masters, outcome))
    rows += [(names[r["path"]], *["-"] * 5, f"{r['status'].upper()}: {r['reason']}") for r in others]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r[:-1], widths, strict=True)) + "  " + str(r[-1])
             for r in [header, *rows]]  # fmt: skip
    ok = sum(1 for e in plan if e["status"] == OK)
    outputs = len({e["output"] for e in plan if e["status"] == OK})
    lines.append(f"{ok} lights -> {outputs} outputs; {len(rows) - ok} files skipped or listed")
    lines += object_notes(plan)
    lines += [colour_message(*key, len(paths)) for key, paths in sorted(colour_lights(plan).items())]
    return "\n".join(lines) + "\n"
