"""Publishing: final named outputs from calibrated intermediates.

A group of one unaligned frame is published as a hard link of its intermediate (no copy; the
intermediate is only ever replaced, never changed in place, and a reused output is checked
against its recorded size and DATASUM, so a damaged link is made again); an
aligned single is resampled onto its sequence's reference grid; a group of several frames is
registered (with ``-a``) and combined in row strips, so memory stays within the budget.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from imgproc import __version__
from imgproc.align import MosaicRegistrar, Registrar, Shift, apply_shift, pier_side_flip
from imgproc.cache import FileCache
from imgproc.colour import flipped_channel_shift, read_frame, write_cube
from imgproc.fitsio import Float32Rows, checksum_problem, link_atomic, read_header, read_image, write_atomic
from imgproc.keywords import normalise
from imgproc.manifest import SKIPPED
from imgproc.progress import Progress
from imgproc.provenance import provenance_cards, recognised_stamp
from imgproc.report import cached_thumbnail
from imgproc.stack import MEMORY, combine
from imgproc.stages import problem_item
from imgproc.stamps import digest, read_json, write_json
from imgproc.timecards import apply_time_cards, header_airmass, kept_history, mean_card_airmass
from imgproc.verify import file_record, size_problem

log = logging.getLogger("imgproc")
_CAL = ("BIASCAL", "DARKCAL", "FLATCAL")
_FILES = ("BIASFILE", "DARKFILE", "FLATFILE")


#: Version of the cards a stack's header gets besides its frames' (in the stamp: stacks made
#: before the combine cards are made again).
STACK_CARDS = "combine cards 1"


@dataclass(frozen=True)
class StackSettings:
    """How frames are registered and combined."""

    align: bool = False
    method: str = "sigclip"
    sigma_low: float = 3.0
    sigma_high: float = 3.0
    memory_budget: int = 2 * 1024**3
    upsample: int = 20
    min_significance: float = 15.0
    order: int = 1


@dataclass(frozen=True)
class Member:
    """One calibrated frame of a group: its intermediate file and plan facts."""

    frame_id: str
    path: Path  # the intermediate file
    source: str  # file name of the raw light
    mid: datetime
    pierside: str | None = None
    measure: Path | None = None  # the intermediate registration measures instead (a green frame)
    cfa: str | None = None  # a colour channel frame: the CFA pattern (as stored) of its light
    channel: str | None = None  # ... and its channel (R, G, B)


class ArrayRows:
    """Row ranges of a frame already in memory, read as :class:`~imgproc.fitsio.Float32Rows`
    reads them from an intermediate file."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape = data, data.shape

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (within the image)."""
        return self.data[start:stop]


class ShiftedSource:
    """Rows of a calibrated frame resampled onto the reference grid, strip by strip.

    ``frame`` gives the frame's rows: its intermediate file (:class:`~imgproc.fitsio.Float32Rows`,
    which reads only the rows a strip needs, plus a margin for interpolation) or its pixels
    already in memory (:class:`ArrayRows`). The part of a strip from outside the frame is NaN.
    """

    def __init__(self, frame: Float32Rows | ArrayRows, shift: Shift, order: int = 1) -> None:
        self.shift, self.order = shift, order
        self._frame = frame

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of the frame."""
        return self._frame.shape

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the (possibly 180°-rotated) frame, NaN outside it."""
        ny, nx = self.shape
        block = np.empty((stop - start, nx), dtype=np.float32)
        lo, hi = min(max(start, 0), stop), max(min(stop, ny), start)
        block[: lo - start] = np.nan
        block[hi - start :] = np.nan
        if lo < hi:
            if self.shift.flipped:
                block[lo - start : hi - start] = self._frame.read(ny - hi, ny - lo)[::-1, ::-1]
            else:
                block[lo - start : hi - start] = self._frame.read(lo, hi)
        return block

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of the aligned frame as float32."""
        whole = math.floor(self.shift.dy)
        margin = 2 + self.order
        window = self._rows(r0 - whole - margin, r1 - whole + margin)
        moved = apply_shift(window, Shift(self.shift.dy - whole, self.shift.dx, False, 1.0), order=self.order)
        return moved[margin : margin + (r1 - r0)]


#: Part of this process's stacking budget (:data:`imgproc.stack.MEMORY`) that the frames of an
#: aligned group may take to be kept in memory from registering to combining (with ``-S 20`` on
#: 2048² frames, 8 frames of 16 MB), instead of being read again from their intermediates, a
#: strip at a time. The combine gets the rest of the budget; bigger groups are read again.
KEEP_FRAMES_SHARE = 0.25

#: Registrars of this process's publish jobs (threads of the workflow's process), built once
#: per reference intermediate and settings.
REGISTRARS: FileCache[Registrar | MosaicRegistrar] = FileCache(512 * 1024**2)


def registrar_for(reference: Path, settings: StackSettings) -> Registrar | MosaicRegistrar:
    """The registrar built on the reference frame's intermediate (see :data:`REGISTRARS`): a
    :class:`MosaicRegistrar` for a colour sensor's frames (a CFA pattern in the header)."""

    def build() -> Registrar | MosaicRegistrar:
        data, header = read_frame(reference)
        data = green(data)
        kind = MosaicRegistrar if normalise(header)["bayerpat"] else Registrar  # colour sensors
        return kind(data, upsample=settings.upsample, min_significance=settings.min_significance)

    return REGISTRARS.get((settings.upsample, settings.min_significance), str(reference), build)


def green(data: np.ndarray) -> np.ndarray:
    """The image registration measures of a frame's pixels: the G plane of an RGB cube, else
    the frame itself."""
    return data[1] if data.ndim == 3 else data


def measure(
    member: Member, data: np.ndarray, registrar: Registrar | MosaicRegistrar, reference_pierside: str | None
) -> Shift:
    """The shift that puts ``member`` (its pixels ``data``) on the reference grid.

    A frame whose PIERSIDE differs from the reference's is rotated by 180° (meridian flip)
    before measuring; when either pier side is unknown, the registrar also tries the rotation
    and keeps it if its peak is clearly stronger. A rotated red or blue channel frame, measured
    on its light's green frame, gets its site's correction (:func:`imgproc.colour.flipped_channel_shift`).
    """
    if pier_side_flip(reference_pierside, member.pierside):
        shift = registrar.measure(np.rot90(data, 2))
        shift = Shift(shift.dy, shift.dx, True, shift.quality, shift.significance)
    else:
        # the rotation is worth trying only when the pier sides do not say it is the same
        known = bool(reference_pierside) and bool(member.pierside)
        shift = registrar.measure(data, try_flip=not known)
    if shift.flipped and member.cfa and member.channel in ("R", "B"):  # measured on green
        dy, dx = flipped_channel_shift(shift.dy, shift.dx, member.cfa, member.channel)
        shift = Shift(dy, dx, True, shift.quality, shift.significance)
    return shift


def combine_cards(settings: StackSettings) -> list[tuple[str, str, str]]:
    """How a stack was combined: STACKMTH (method), STACKREJ (rejection) and STACKNRM
    (normalisation), as (keyword, value, comment)."""
    rejection = "none"
    if settings.method == "sigclip":
        rejection = f"sigma {settings.sigma_low:g} low {settings.sigma_high:g} high"
    return [
        ("STACKMTH", settings.method, "combine method (sigclip: mean after rejection)"),
        ("STACKREJ", rejection, "about the median, std, 1 pass"),
        ("STACKNRM", "none", "frames combined as calibrated, not scaled"),
    ]


def stack_header(
    headers: Sequence[fits.Header],
    members: Sequence[Member],
    shifts: Sequence[Shift | None],
    settings: StackSettings | None = None,
) -> fits.Header:
    """Header of a stack: its first frame's, plus NCOMBINE, LIVETIME (summed exposure), how it
    was combined (:func:`combine_cards`), the UTC time cards of the frames and their mean
    AIRMASS (:func:`imgproc.timecards.apply_time_cards`), calibration flags true only if true
    for every frame, and HISTORY cards listing every input with its masters and applied shift
    (and the camera's time cards the first frame replaced)."""
    out = headers[0].copy() if shifts[0] is None else aligned_header(headers[0], shifts[0])
    replaced = kept_history(out)
    out.remove("HISTORY", ignore_missing=True, remove_all=True)
    for line in replaced:
        out.add_history(line)
    out.set("NCOMBINE", len(headers), "number of frames combined")
    for key, value, comment in combine_cards(settings or StackSettings()):
        out.set(key, value, comment)
    exptimes = [float(h.get("EXPTIME", 0) or 0) for h in headers]
    frames = [(m.mid - timedelta(seconds=e / 2.0), e) for m, e in zip(members, exptimes, strict=True)]
    computed = header_airmass(out, [m.mid for m in members])
    apply_time_cards(out, frames, computed, history=False)
    if computed is None and (cameras := mean_card_airmass(headers)) is not None:
        out.set("AIRMASS", round(cameras, 6), "mean of the frames' AIRMASS cards")
    out.set("LIVETIME", float(sum(exptimes)), "[s] summed exposure")
    for key in _CAL:
        out.set(key, all(bool(h.get(key, False)) for h in headers))
    for key in ("ALIGNDX", "ALIGNDY", "ALIGNFLP"):
        out.remove(key, ignore_missing=True)
    out.add_history(f"Calibrated and stacked by imgproc {__version__}")
    for header, member, shift in zip(headers, members, shifts, strict=True):
        masters = ",".join(str(header.get(key, "-")) for key in _FILES)
        moved = (
            ""
            if shift is None
            else f" dx={shift.dx:+.3f} dy={shift.dy:+.3f}{' flip' if shift.flipped else ''}"
        )
        out.add_history(f"input {member.source} masters={masters}{moved}")
    return out


def aligned_header(header: fits.Header, shift: Shift) -> fits.Header:
    """A single frame's header after resampling: ALIGNDX/ALIGNDY/ALIGNFLP, and its WCS moved
    with the pixels (CRPIX shifted; a 180° flip also reflects CRPIX and negates CD/PC)."""
    out = header.copy()
    ny, nx = int(out["NAXIS2"]), int(out["NAXIS1"])
    if shift.flipped:
        for axis, n in ((1, nx), (2, ny)):
            if f"CRPIX{axis}" in out:
                out[f"CRPIX{axis}"] = n + 1 - float(out[f"CRPIX{axis}"])
        for key in [k for k in out if k[:2] in ("CD", "PC") and k[2:3].isdigit()]:
            out[key] = -float(out[key])
    for axis, delta in ((1, shift.dx), (2, shift.dy)):
        if f"CRPIX{axis}" in out:
            out[f"CRPIX{axis}"] = float(out[f"CRPIX{axis}"]) + delta
    out.set("ALIGNDX", round(shift.dx, 4), "[px] x shift applied to reach the reference grid")
    out.set("ALIGNDY", round(shift.dy, 4), "[px] y shift applied to reach the reference grid")
    out.set("ALIGNFLP", shift.flipped, "rotated 180 deg (meridian flip) before shifting")
    return out


def publish_single_aligned(
    member: Member, shift: Shift, target: Path, order: int, cards: Sequence[tuple[str, str, str]] = ()
) -> None:
    """Resample one frame (each plane of an RGB cube alike) onto the reference grid and write it
    to ``target``, with ``cards`` (keyword, value, comment) set in its header."""
    data, header = read_frame(member.path)
    header = aligned_header(header, shift)
    for key, value, comment in cards:
        header.set(key, value, comment)
    planes = data if data.ndim == 3 else data[None]
    moved = np.stack(
        [
            apply_shift(np.rot90(plane, 2).copy() if shift.flipped else plane,
                        Shift(shift.dy, shift.dx, False, shift.quality), order=order)
            for plane in planes
        ]
    )  # fmt: skip
    write_output(target, moved if data.ndim == 3 else moved[0], header)


def write_output(target: Path, data: np.ndarray, header: fits.Header) -> None:
    """Write a frame, or an RGB cube, to ``target`` atomically."""
    if data.ndim == 3:
        write_cube(target, data, header)
    else:
        write_atomic(target, data, header)


def publish_stack(
    members: Sequence[Member],
    shifts: Sequence[Shift | None],
    target: Path,
    settings: StackSettings,
    threads: int = 1,
    frames: Sequence[tuple[np.ndarray, fits.Header]] | None = None,
    cards: Sequence[tuple[str, str, str]] = (),
) -> tuple[np.ndarray, fits.Header]:
    """Combine ``members`` (each resampled by its shift, if any) into ``target``, with ``cards``
    (keyword, value, comment) set in its header; returns the stack and its header.

    ``frames`` are the members' pixels and headers when the caller holds them (it read them to
    register them): the combine then gets :data:`KEEP_FRAMES_SHARE` less of the budget. Without
    them each member is read from its intermediate, a strip at a time.
    """
    if frames is None:
        headers = [read_header(member.path)[0] for member in members]
        rows: list[Float32Rows | ArrayRows] = [Float32Rows(member.path) for member in members]
        budget = settings.memory_budget
    else:
        headers = [header for _, header in frames]
        rows = [ArrayRows(data) for data, _ in frames]
        budget = int(settings.memory_budget * (1 - KEEP_FRAMES_SHARE))
    no_shift = Shift(0.0, 0.0, False, 1.0)
    cube = frames is not None and frames[0][0].ndim == 3
    # an RGB cube is combined plane by plane, each plane moved by its frame's shift
    layers = [[ArrayRows(data[plane]) for data, _ in frames] for plane in range(3)] if cube else [rows]  # type: ignore[union-attr]
    planes = [
        combine(
            [ShiftedSource(r, s or no_shift, settings.order) for r, s in zip(layer, shifts, strict=True)],
            method=settings.method,
            sigma_low=settings.sigma_low,
            sigma_high=settings.sigma_high,
            memory_budget=budget,
            threads=threads,
        )
        for layer in layers
    ]
    data = np.stack(planes) if cube else planes[0]
    header = stack_header(headers, members, shifts, settings)
    for key, value, comment in cards:
        header.set(key, value, comment)
    write_output(target, data, header)
    return data, header


def _shift_record(shift: Shift) -> dict[str, Any]:
    return {"dy": round(shift.dy, 4), "dx": round(shift.dx, 4), "flipped": shift.flipped,
            "quality": round(shift.quality, 4), "significance": round(shift.significance, 1)}  # fmt: skip


def check_shift(shift: Shift, registrar: Registrar | MosaicRegistrar) -> str:
    """Why a measured shift cannot be used ('' when it can)."""
    if registrar.accepts(shift):
        return ""
    return (
        f"alignment failed: correlation peak {shift.significance:.1f} sigma above the surface, "
        f"below {registrar.min_significance:g}"
    )


def plan_members(entries: Sequence[Mapping[str, Any]], workdir: Path) -> list[Member]:
    """Members of a group from its plan rows."""
    return [
        Member(
            frame_id=str(e["frame_id"]),
            path=workdir / "cal" / f"{e['frame_id']}.fits",
            source=Path(str(e["path"])).name,
            mid=datetime.fromisoformat(str(e["mid"])),
            pierside=e.get("pierside"),  # type: ignore[arg-type]
            measure=workdir / "cal" / f"{e['measure']}.fits"
            if e.get("measure") not in (None, "", e["frame_id"])
            else None,
            cfa=e.get("cfa") or None,  # type: ignore[arg-type]
            channel=e.get("channel") or None,  # type: ignore[arg-type]
        )
        for e in entries
    ]


def publish_group(
    name: str,
    entries: Sequence[Mapping[str, Any]],
    reference: Mapping[str, Any] | None,
    workdir: Path,
    outdir: Path,
    settings: StackSettings,
    threads: int = 1,
) -> dict[str, Any]:
    """Make one final output from its group's intermediates; returns its receipt item.

    With ``threads`` > 1 the frames are registered, and the stack combined, on that many
    threads at once.

    An existing output is replaced only when it was made by imgproc from the same lights (its
    stamp file in ``work/pub`` says so, or without one its own header,
    :func:`imgproc.provenance.recognised_stamp`); anything else at that name is left untouched
    and reported. One recognised by its header whose stamp is current is kept as it is.
    """
    members = plan_members(entries, workdir)
    stamps = {m.frame_id: (read_json(m.path.with_suffix(".json")) or {}).get("stamp") for m in members}
    excluded = {
        m.frame_id: "not calibrated" for m in members if not stamps[m.frame_id] or not m.path.exists()
    }
    members = [m for m in members if m.frame_id not in excluded]
    sources = sorted(str(e["path"]) for e in entries)
    target, stamp_path = outdir / name, workdir / "pub" / f"{name}.json"
    previous = read_json(stamp_path)
    recognised = recognised_stamp(target, sources) if previous is None and target.exists() else None
    if recognised is not None:
        previous = {"sources": sources, "stamp": None}
    if target.exists() and (previous is None or previous.get("sources") != sources):
        return {
            "status": SKIPPED,
            "excluded": excluded,
            "reason": f"{target} exists and was not made by imgproc from these lights; not overwritten",
        }
    if not members:
        return {"status": SKIPPED, "reason": "no calibrated frame", "excluded": excluded}
    ref_stamp = None
    if settings.align and reference is not None:
        ref_stamp = (read_json(workdir / "cal" / f"{reference['frame_id']}.json") or {}).get("stamp")
    how = {key: value for key, value in asdict(settings).items() if key != "memory_budget"}  # same bytes
    stamp = digest([name, [stamps[m.frame_id] for m in members], ref_stamp, how, __version__, STACK_CARDS])
    if target.exists() and previous.get("stamp") == stamp:
        problem = size_problem(target, previous) or checksum_problem(target)
        if not problem:
            kept = ("ncombine", "excluded", "shifts", "size")
            return {key: previous.get(key) for key in kept} | {"status": "reused"}
        log.warning("%s: made again", problem)
    linked = len(members) == 1 and not settings.align  # the output is the intermediate: its stamp
    if recognised is not None and recognised == (stamps[members[0].frame_id] if linked else stamp):
        ncombine = int(fits.getheader(target).get("NCOMBINE", 1))
        item = {"status": "reused", "ncombine": ncombine, "excluded": excluded, "shifts": {}}
        item |= file_record(target)
        write_json(stamp_path, {"sources": sources, "stamp": stamp, **item})
        return item
    write_json(stamp_path, {"sources": sources, "stamp": None})
    shifts: list[Shift | None] = [None] * len(members)
    frames: list[tuple[np.ndarray, fits.Header]] | None = None
    if settings.align and entries[0].get("pub_kind") != "link":  # a mosaic is never resampled
        if reference is None or not (workdir / "cal" / f"{reference['frame_id']}.fits").exists():
            return {
                "status": SKIPPED,
                "reason": "the sequence's reference frame was not calibrated",
                "excluded": excluded,
            }
        registrar = registrar_for(workdir / "cal" / f"{reference['frame_id']}.fits", settings)
        pierside = reference.get("pierside")
        group_bytes = len(members) * registrar.shape[0] * registrar.shape[1] * 4
        keep = len(members) > 1 and group_bytes <= MEMORY.budget(settings.memory_budget) * KEEP_FRAMES_SHARE

        def register(member: Member) -> tuple[Shift, tuple[np.ndarray, fits.Header] | None]:
            data, header = read_frame(member.path)
            probe = green(data) if member.measure is None else read_image(member.measure)[0]
            held = (data, header) if keep or data.ndim == 3 else None  # cubes are combined in memory
            return measure(member, probe, registrar, pierside), held

        with ThreadPoolExecutor(threads) as pool:
            measured = list(pool.map(register, members))
        for member, (shift, _) in zip(members, measured, strict=True):
            problem = check_shift(shift, registrar)
            if problem:
                excluded[member.frame_id] = problem
        kept = [(m, *r) for m, r in zip(members, measured, strict=True) if m.frame_id not in excluded]
        if not kept:
            return {"status": SKIPPED, "reason": "no frame could be aligned", "excluded": excluded}
        members, shifts = [m for m, _, _ in kept], [s for _, s, _ in kept]
        frames = [f for _, _, f in kept] if kept[0][2] is not None else None  # type: ignore[misc]
    if frames is None and len(members) > 1 and entries[0].get("channel") == "RGB":  # cubes: in memory
        frames = [read_frame(member.path) for member in members]
    single_shift = shifts[0]
    cards = provenance_cards(stamp, sources)
    made: tuple[np.ndarray | None, fits.Header | None] = (None, None)
    if len(members) > 1:
        made = publish_stack(members, shifts, target, settings, threads, frames, cards)
    elif single_shift is None:
        link_atomic(members[0].path, target)
    else:
        publish_single_aligned(members[0], single_shift, target, settings.order, cards)
    if any(entry.get("thumb") for entry in entries):  # here, in parallel jobs, not in the report
        cached_thumbnail(target, workdir / "thumbs", data=made[0], header=made[1])
    records = {m.frame_id: _shift_record(s) for m, s in zip(members, shifts, strict=True) if s is not None}
    item = {"status": "written", "ncombine": len(members), "excluded": excluded, "shifts": records}
    item |= file_record(target)
    write_json(stamp_path, {"sources": sources, "stamp": stamp, **item})
    return item


def run_publish_batch(
    entries: Sequence[Mapping[str, Any]],
    references: Mapping[str, Mapping[str, Any]],
    workdir: Path,
    outdir: Path,
    receipt: Path,
    settings: StackSettings,
    threads: int = 1,
) -> dict[str, dict]:
    """Make the final outputs of one publish batch and write the batch receipt.

    ``references`` maps a reference frame id to its plan row (used with alignment); each
    group is made on ``threads`` threads.
    """
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for entry in entries:
        groups[str(entry["output"])].append(entry)
    results: dict[str, dict] = {}
    progress = Progress(f"publish {receipt.stem}", len(groups))
    for done, (name, group) in enumerate(sorted(groups.items()), start=1):
        reference = references.get(str(group[0].get("reference") or ""))
        try:
            results[name] = publish_group(name, group, reference, workdir, outdir, settings, threads)
        except Exception as exc:  # one output's error, whatever it is, must not stop the batch
            inputs = [workdir / "cal" / f"{e['frame_id']}.fits" for e in group]
            results[name] = problem_item(exc, name, "publishing failed", inputs) | {"excluded": {}}
        progress.step(done)
    write_json(receipt, {"kind": "publish", "items": results, "seconds": progress.elapsed()})
    return results
