"""Workflow adapter: match masters, group and batch every light into the plan."""

from pathlib import Path

from imgproc.plan import PlanSettings
from imgproc.stages import job_logging, run_plan

sm = snakemake  # noqa: F821  (given by run_script in rules/common.smk, or by script:)
with job_logging(sm.log[0], sm.config.get("verbose", False)):
    run_plan(
        Path(sm.input.manifest),
        Path(sm.output.plan),
        Path(sm.output.masters),
        PlanSettings(**sm.params.settings),
    )
