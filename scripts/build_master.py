"""Workflow adapter: combine raw calibration frames into one master."""

from pathlib import Path

from imgproc.stages import job_logging, run_build_master

sm = snakemake  # noqa: F821  (given by run_script in rules/common.smk, or by script:)
with job_logging(sm.log[0], sm.config.get("verbose", False)):
    run_build_master(sm.params.entry, Path(sm.output.master), sm.params.memory_budget)
