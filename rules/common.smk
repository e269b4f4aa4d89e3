# Setup shared by all rules: config validation, the working folder, and the input functions
# that turn the plan (work/plan.tsv, written by the plan_frames checkpoint) into batch jobs.
import gc
import os
import sys

from snakemake.logging import logger
from snakemake.utils import validate

validate(config, schema=os.path.join(workflow.basedir, "schemas", "config.schema.yaml"))

# In a source checkout the imgproc package sits beside the Snakefile.
sys.path.insert(0, workflow.basedir)
from imgproc.dag import CALIBRATE_PRIORITY, Layout, WorkflowInputs  # noqa: E402
from imgproc.workers import (  # noqa: E402
    WorkerPool,
    cancel_timers_at_exit,
    job_namespace,
    keep_freed_memory,
    run_adapter,
    use_processes,
)

LAYOUT = Layout(config)


workdir: config["output_dir"]


INPUTS = WorkflowInputs(LAYOUT, lambda: checkpoints.plan_frames.get().output)


wildcard_constraints:
    cal_batch=r"c\d{4}",
    pub_batch=r"p\d{4}",
    master=r"master_[^/]+",


#: Jobs that go to worker processes when the run has them (imgproc.workers).
FRAME_JOBS = {"calibrate_batch", "publish_batch"}
WORKERS = None


def run_script(name, **job):
    """Run the adapter scripts/<name>.py inside this Snakemake process, with the `snakemake`
    object a `script:` job gets (input, output, params, log, threads and config).

    A `script:` job starts a new Python interpreter and imports numpy and astropy again, about
    0.6-1 s a job, which was most of the wall time of a night. With --force-use-threads (set by
    profiles/default, the workflow profile Snakemake loads by itself) Snakemake runs `run:` jobs
    as threads of its own process, and numpy and file I/O release the GIL, so jobs still run in
    parallel. The frame jobs of a big night run in worker processes (start_workers). On a
    cluster each job is a Snakemake process of its own on its node, as before.
    """
    script = os.path.join(workflow.basedir, "scripts", f"{name}.py")
    threads = job.pop("threads")
    sm = job_namespace(config, threads, **job)
    if WORKERS is not None and name in FRAME_JOBS:
        WORKERS.run(run_adapter, script, sm, os.getcwd())
    else:
        run_adapter(script, sm)


def start_workers():
    """At the start of a local run (onstart), start the worker processes in the background if
    the config's `workers` asks for them (`auto`: 2 cores or more and 1 GiB of lights)."""
    global WORKERS
    if workflow.local_exec and use_processes(config["workers"], workflow.cores, config["input_dir"]):
        WORKERS = WorkerPool(workflow.cores)
        WORKERS.start()
        logger.info(f"imgproc: frame jobs run in {workflow.cores} worker processes (config: workers)")


keep_freed_memory()
cancel_timers_at_exit()


def exit_promptly():
    """Let the Snakemake process end as soon as the run is over (onsuccess and onerror).

    The workers stop now. The rate limiter's pending Timers are cancelled at the exit itself,
    on every way out (cancel_timers_at_exit). Then the interpreter's final garbage collection
    walks every object of Snakemake, numpy and astropy, another 0.2-0.5 s; frozen objects are
    skipped.
    """
    if WORKERS is not None:
        WORKERS.close()
    gc.freeze()
