"""Stamps and JSON records: how a stage knows whether its earlier result is still valid.

Every intermediate, output and batch receipt records a digest of what it was made from (paths,
sizes, modification and change times of its inputs, and the settings), written deterministically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> None:
    """Write JSON deterministically (sorted keys) and atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """JSON content of ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def file_id(path: str | Path) -> list:
    """Identity of a file for stamps: path, size, modification and inode change times (ns).

    The kernel sets the change time on every write (and on a change of permissions or links),
    and no program can set it back, so a file rewritten with its old size and modification
    time is still seen as changed."""
    stat = os.stat(path)
    return [str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def digest(data: Any) -> str:
    """A stable digest of JSON-serialisable data."""
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def receipt_items(receipts: Iterable[Mapping[str, Any]]) -> tuple[dict[str, dict], dict[str, dict]]:
    """The items of batch receipts, split into (calibrated frames, published outputs)."""
    calibrated: dict[str, dict] = {}
    published: dict[str, dict] = {}
    for receipt in receipts:
        (published if receipt.get("kind") == "publish" else calibrated).update(receipt.get("items", {}))
    return calibrated, published
