"""Verification of earlier work before a run trusts it.

A batch receipt (``work/calibrated/*.json``, ``work/published/*.json``) tells Snakemake that a
batch is done, and Snakemake looks no further than its modification time. Before each run the
``imgproc`` command checks every receipt against the files it names and drops a receipt that no
longer holds, so Snakemake redoes that batch (and the batch then rebuilds only what is bad):

- a file the batch wrote is missing, or its size is not the size recorded when it was written
  (a truncated intermediate, and a hard-linked output with it);
- an item failed with an internal error or with a passing fault of the machine (a full disk,
  an I/O error, memory): it is tried again;
- the receipt of a batch the plan names is gone (deleted by hand to redo the batch): the
  summary goes, so Snakemake, which otherwise passes over a missing intermediate behind
  up-to-date targets, makes it again;
- a light or master the batch used was rewritten since (its size, modification time or inode
  change time differ: the kernel sets the change time on every write and no program can set it
  back, so a file rewritten with its old size and modification time is caught too).

Intermediates deleted by ``--clean`` (:func:`clean_intermediates`) do not make their receipts
stale while the config is the one they were deleted under, so such a rerun has nothing to do;
an output to make again may need them, and then they are made again. A ``work/`` deleted by
hand makes every job run again; the outputs are then recognised by their own headers
(:mod:`imgproc.provenance`).

Reading every file to check its DATASUM before each run would cost as much as reading the whole
night again, so it is asked for (``imgproc --verify``); a file that a batch reuses is always
checked against its own DATASUM
(:func:`imgproc.fitsio.checksum_problem`). This module reads no FITS file: the command imports it.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from imgproc.limits import PREPARED_DIR, SCRATCH_PREFIX
from imgproc.manifest import FAILED, OK, SKIPPED, read_tsv
from imgproc.stamps import digest, file_id, read_json, write_json

#: The record of the intermediates ``--clean`` deleted (in ``work/``).
CLEANED_NAME = "cleaned.json"

#: errno values of faults that pass (space freed, device back): never remembered as results.
TRANSIENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EAGAIN, errno.ESTALE, errno.ETIMEDOUT}
)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a fault of the machine that may pass (disk full, I/O error, memory),
    as opposed to a problem of the input or a bug."""
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS)


def file_record(path: Path) -> dict[str, int]:
    """What a receipt records of a file it wrote: its size in bytes."""
    return {"size": path.stat().st_size}


def size_problem(path: Path, item: Mapping[str, Any]) -> str:
    """Why ``path``, written by the batch whose receipt holds ``item``, cannot be trusted ("" if
    it can): missing, or not of the recorded size."""
    try:
        size = path.stat().st_size
    except OSError:
        return f"{path.name} is missing"
    recorded = item.get("size")
    if recorded is not None and size != recorded:
        return f"{path.name} has {size} bytes, {recorded} when it was written"
    return ""


def stale_receipts(
    output: Path, checksums: bool = False, cleaned: Collection[str] = ()
) -> tuple[dict[Path, str], dict[Path, str]]:
    """Receipts under ``output/work`` that no longer hold, with the first reason of each; with
    ``checksums``, every file they name is also read and checked against its DATASUM. The
    intermediates of ``cleaned`` frames may be missing: the calibrate receipts that hold only
    because of that come second, with the first such missing file."""
    stale: dict[Path, str] = {}
    deferred: dict[Path, str] = {}

    def intermediate(frame_id: str) -> Path:
        return output / "work" / "cal" / f"{frame_id}.fits"

    for folder, target in (("calibrated", intermediate), ("published", output.joinpath)):
        for receipt in sorted((output / "work" / folder).glob("*.json")):
            try:
                items = json.loads(receipt.read_text(encoding="utf-8"))["items"]
            except (OSError, ValueError, KeyError, TypeError):
                stale[receipt] = "unreadable receipt"
                continue
            for key, item in sorted(items.items()):
                if folder == "calibrated" and key in cleaned and not target(key).exists():
                    deferred.setdefault(receipt, f"{target(key).name} is missing")
                    continue
                reason = _item_problem(target(key), item, checksums)
                if reason:
                    stale[receipt] = reason
                    break
    return stale, {receipt: reason for receipt, reason in deferred.items() if receipt not in stale}


def missing_receipts(output: Path) -> list[str]:
    """Receipts (``calibrated/c0000``…) of the batches the plan names that are not on disk."""
    plan = output / "work" / "plan.tsv"
    rows = [row for row in read_tsv(plan) if row["status"] == OK] if plan.exists() else []
    batches = {("calibrated", row["cal_batch"]) for row in rows} | {
        ("published", row["pub_batch"]) for row in rows
    }
    return [
        f"{folder}/{batch}"
        for folder, batch in sorted(batches)
        if batch and not (output / "work" / folder / f"{batch}.json").exists()
    ]


def _item_problem(path: Path, item: Mapping[str, Any], checksums: bool) -> str:
    if item.get("retry"):
        return f"{path.name}: {item.get('reason', 'a passing fault')}"
    if item.get("status") == FAILED:
        return f"{path.name} failed: tried again"
    if item.get("status") == SKIPPED:
        return ""
    problem = size_problem(path, item)
    if not problem and checksums:
        from imgproc.fitsio import checksum_problem  # astropy: only when asked (--verify)

        problem = checksum_problem(path)
    return problem


def changed_sources(manifest: Path) -> list[str]:
    """Files of the manifest that changed since the scan read them, in a way Snakemake does not
    see: same size and modification time, another inode change time."""
    changed = []
    for row in read_tsv(manifest) if manifest.exists() else []:
        try:
            now = file_id(row["path"])
        except OSError:
            continue  # gone: Snakemake sees a missing input itself
        recorded = row.get("ctime_ns")
        if recorded is not None and now[1:3] == [row["size"], row["mtime_ns"]] and now[3] != recorded:
            changed.append(row["path"])
    return changed


def invalidate(output: Path, checksums: bool = False) -> list[str]:
    """Drop every receipt that no longer holds (:func:`stale_receipts`, which reads every file
    with ``checksums``); when a file was rewritten behind Snakemake's back
    (:func:`changed_sources`), drop the manifest and every calibrate receipt, so the files are
    read again and each batch compares its frames' stamps (which hold the change times: only
    the frames of a changed light or master are made again). Returns one line per reason.

    The summary goes too whenever anything is dropped: Snakemake does not revisit the jobs
    behind an up-to-date plan checkpoint, but a missing summary makes it rebuild everything the
    summary needs."""
    notes = []
    rewritten = changed_sources(output / "work" / "manifest.tsv")
    if rewritten:  # read again, and every batch checks its stamps (only changed frames are redone)
        (output / "work" / "manifest.tsv").unlink()
        for receipt in (output / "work" / "calibrated").glob("*.json"):
            receipt.unlink()
        notes += [f"{path} was rewritten since it was read: read again" for path in rewritten]
    stale, deferred = stale_receipts(output, checksums, cleaned_frames(output))
    if any(receipt.parent.name == "published" for receipt in stale):  # may need cleaned intermediates
        (output / "work" / CLEANED_NAME).unlink(missing_ok=True)
        stale |= deferred
    for receipt, reason in stale.items():
        receipt.unlink(missing_ok=True)
        notes.append(f"{receipt.parent.name}/{receipt.stem}: {reason}: redone")
    if (output / "summary.json").exists():
        if not (output / "work" / "plan.tsv").exists():
            notes.append("work/ is gone: every step is judged again, and outputs are kept where current")
        notes += [f"{receipt}: receipt missing: redone" for receipt in missing_receipts(output)]
    if notes:
        (output / "summary.json").unlink(missing_ok=True)
    return notes


def remove_scratch(output: Path) -> int:
    """Delete the scratch folders of stacks that a killed run left in ``work/pub`` (their
    resampled frames: 640 MiB for 40 frames of 2048²); bytes freed. Only while no run works in
    ``output`` (the command holds its run lock): a running stack deletes its own."""
    freed = 0
    for folder in sorted((output / "work" / "pub").glob(f"{SCRATCH_PREFIX}*")):
        freed += sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
        shutil.rmtree(folder)
    return freed


def _config_digest(output: Path) -> str:
    return digest((output / "imgproc.yaml").read_text(encoding="utf-8"))


def cleaned_frames(output: Path) -> set[str]:
    """Frames whose intermediates ``--clean`` deleted under the config the run has now; none (and
    the record goes) when the config changed since: then what needs them makes them again."""
    record = output / "work" / CLEANED_NAME
    data = read_json(record) or {}
    if data and data.get("config") == _config_digest(output):
        return set(data.get("frames", []))
    record.unlink(missing_ok=True)
    return set()


def clean_intermediates(output: Path) -> tuple[int, int]:
    """Delete the intermediates (``work/cal/*.fits``; an output hard-linked to one keeps its
    data), recording them for :func:`cleaned_frames`, and the big masters prepared for
    calibration (``work/prepared``); (intermediates deleted, bytes freed)."""
    files = sorted((output / "work" / "cal").glob("*.fits"))
    frames = cleaned_frames(output) | {path.stem for path in files}
    write_json(output / "work" / CLEANED_NAME, {"config": _config_digest(output), "frames": sorted(frames)})
    freed = 0
    for path in [*files, *sorted((output / "work" / PREPARED_DIR).glob("*"))]:
        stat = path.stat()
        freed += stat.st_size if stat.st_nlink == 1 else 0
        path.unlink()
    return len(files), freed
