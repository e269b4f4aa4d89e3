"""What an output says about its own making, so that it is recognised without ``work/``.

Every intermediate (and so every hard-linked output) and every aligned or stacked output carries
two cards: ``IMGSTAMP``, the stamp of what it was made from and how (the one its stamp file in
``work/`` holds), and ``IMGSRC``, a digest of the raw lights it was made from. A file at an
output's name whose ``CHECKSUM`` and ``DATASUM`` verify and whose ``IMGSRC`` is that of the
output's lights was written by imgproc for that output: a rerun whose ``work/`` is gone reuses it
when its ``IMGSTAMP`` is current and replaces it when not. Any other file is never overwritten.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

from astropy.io import fits

from imgproc.stamps import digest


def sources_digest(sources: Iterable[str]) -> str:
    """Digest of the raw lights (paths) an output is made from, in any order."""
    return digest(sorted(sources))


def provenance_cards(stamp: str, sources: Iterable[str]) -> list[tuple[str, str, str]]:
    """The IMGSTAMP and IMGSRC cards, as (keyword, value, comment)."""
    return [
        ("IMGSTAMP", stamp, "imgproc inputs+settings"),
        ("IMGSRC", sources_digest(sources), "imgproc: the raw lights"),
    ]


def recognised_stamp(path: Path, sources: Iterable[str]) -> str | None:
    """The IMGSTAMP of ``path`` when imgproc made it from ``sources`` (its IMGSRC says so and
    its checksums verify), else None."""
    try:
        with warnings.catch_warnings(), fits.open(path, memmap=False) as hdul:
            warnings.simplefilter("ignore")
            hdu = hdul[0]
            if hdu.header.get("IMGSRC") != sources_digest(sources) or "IMGSTAMP" not in hdu.header:
                return None
            if hdu.verify_checksum() != 1 or hdu.verify_datasum() != 1:
                return None
            return str(hdu.header["IMGSTAMP"])
    except (OSError, ValueError, IndexError):
        return None
