"""Workflow adapter: calibrate one batch of lights to intermediate files."""

from pathlib import Path

from imgproc.stages import job_logging, run_calibrate_batch

sm = snakemake  # noqa: F821  (given by run_script in rules/common.smk, or by script:)
with job_logging(sm.log[0], sm.config.get("verbose", False)):
    run_calibrate_batch(
        sm.params.entries,
        Path("work"),
        Path(sm.output.receipt),
        observer=sm.params.observer,
        binning=sm.params.binning,
        quality=sm.params.quality,
    )
