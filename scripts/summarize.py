"""Workflow adapter: write summary.json and summary.txt."""

from pathlib import Path

from imgproc.stages import job_logging, run_summary

sm = snakemake  # noqa: F821  (given by run_script in rules/common.smk, or by script:)
with job_logging(sm.log[0], sm.config.get("verbose", False)):
    run_summary(
        Path(sm.input.manifest), Path(sm.input.plan), Path(sm.input.masters_table),
        [Path(p) for p in sm.input.receipts], Path(sm.output.json), Path(sm.output.text),
    )  # fmt: skip
