"""The size above which a frame is streamed by rows, never held whole, by every job that reads
one (calibration, alignment, stacking) and by the workflow's memory requests for those jobs.

Imports nothing heavy: the workflow's resource functions (:mod:`imgproc.dag`) use it when
Snakemake parses the workflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Frames bigger than this (float32 bytes) are not held whole: while one is calibrated its
#: masters are mapped a block of rows at a time as each light goes through
#: (:class:`~imgproc.calibrate.MasterRows`) and the light streams through a buffer of one
#: block (a 61-megapixel camera's bias, dark, flat and light are 980 MB in every worker
#: process); it is aligned and stacked by bands of rows. Up to it (4096² pixels), whole
#: frames are faster and small.
WHOLE_FRAME_MAX_BYTES = 64 << 20
#: Folder of the work folder where the masters of such frames are kept prepared for
#: calibration (:func:`imgproc.calibrate.prepared_master`); ``--clean`` deletes it.
PREPARED_DIR = "prepared"
#: Prefix of the scratch folders in ``work/pub`` that hold an aligned stack's resampled frames
#: while it is combined (:func:`imgproc.publish.publish_group`), deleted with the stack; one
#: left by a killed run is deleted by the next (:func:`imgproc.verify.remove_scratch`).
SCRATCH_PREFIX = "resampled-"


def _float32_bytes(shape: Sequence[int]) -> int:
    return math.prod(int(n) for n in shape[-2:]) * 4


def held_whole(shape: Sequence[int]) -> bool:
    """Whether a frame of ``shape`` (rows, columns) is held whole as float32, or is too big
    (over :data:`WHOLE_FRAME_MAX_BYTES`) and streamed by rows."""
    return _float32_bytes(shape) <= WHOLE_FRAME_MAX_BYTES


def held_bytes(shape: Sequence[int]) -> int:
    """Float32 bytes of a frame of ``shape`` that a job holds at once: the whole frame, or
    for a streamed one at most :data:`WHOLE_FRAME_MAX_BYTES`."""
    return min(_float32_bytes(shape), WHOLE_FRAME_MAX_BYTES)
