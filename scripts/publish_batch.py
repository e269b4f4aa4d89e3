"""Workflow adapter: make the final named outputs of one batch of groups."""

from pathlib import Path

from imgproc.publish import StackSettings, run_publish_batch
from imgproc.stages import job_logging

sm = snakemake  # noqa: F821  (given by run_script in rules/common.smk, or by script:)
with job_logging(sm.log[0], sm.config.get("verbose", False)):
    run_publish_batch(
        sm.params.entries, sm.params.references, Path("work"), Path("."), Path(sm.output.receipt),
        StackSettings(**sm.params.settings), threads=sm.threads,
    )  # fmt: skip
