# Setup shared by all rules: config validation, the working folder, and the input functions
# that turn the plan (work/plan.tsv, written by the plan_frames checkpoint) into batch jobs.
import gc
import os
import runpy
import sys
import threading
from types import SimpleNamespace

from snakemake.utils import validate

validate(config, schema=os.path.join(workflow.basedir, "schemas", "config.schema.yaml"))

# In a source checkout the imgproc package sits beside the Snakefile.
sys.path.insert(0, workflow.basedir)
from imgproc.dag import CALIBRATE_PRIORITY, Layout, WorkflowInputs  # noqa: E402

LAYOUT = Layout(config)


workdir: config["output_dir"]


INPUTS = WorkflowInputs(LAYOUT, lambda: checkpoints.plan_frames.get().output)


wildcard_constraints:
    cal_batch=r"c\d{4}",
    pub_batch=r"p\d{4}",
    master=r"master_[^/]+",


def run_script(name, **job):
    """Run the adapter scripts/<name>.py inside this Snakemake process, with the `snakemake`
    object a `script:` job gets (input, output, params, log, threads and config).

    A `script:` job starts a new Python interpreter and imports numpy and astropy again, about
    0.6-1 s a job, which was most of the wall time of a night. With --force-use-threads (set by
    profiles/default, the workflow profile Snakemake loads by itself) Snakemake runs `run:` jobs
    as threads of its own process, and numpy and file I/O release the GIL, so jobs still run in
    parallel. On a cluster each job is a Snakemake process of its own on its node, as before.
    """
    script = os.path.join(workflow.basedir, "scripts", f"{name}.py")
    runpy.run_path(script, init_globals={"snakemake": SimpleNamespace(config=config, **job)})


def keep_freed_memory():
    """Let the C allocator reuse freed frame buffers instead of returning them to the kernel.

    Jobs run as threads, and a thread's frame-sized arrays come from a malloc arena of its own
    that hands freed memory straight back; every new 16 MB array was then page-faulted in
    again: 350,000 faults and 2-4 s of kernel time for 300 frames of 2048². With arrays up to
    32 MiB served from the arenas and up to 64 MiB of free memory kept in each, that is 47,000
    faults. glibc only; elsewhere nothing changes.
    """
    import ctypes

    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's maximum)
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD


keep_freed_memory()


def exit_promptly():
    """Let the Snakemake process end as soon as the run is over (onsuccess and onerror).

    Its scheduler re-arms a one-second threading.Timer (the job rate limiter) on every round,
    and the interpreter waits for a pending timer before it exits: up to a second of nothing.
    Then the interpreter's final garbage collection walks every object of Snakemake, numpy and
    astropy, another 0.2-0.5 s; frozen objects are skipped.
    """
    for thread in threading.enumerate():
        if isinstance(thread, threading.Timer):
            thread.cancel()
    gc.freeze()
