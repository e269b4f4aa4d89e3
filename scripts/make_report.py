"""Workflow adapter: write report.html, the self-contained HTML report of the run."""

from pathlib import Path

from imgproc.report import write_report
from imgproc.stages import job_logging

sm = snakemake  # noqa: F821  (given by run_script in rules/common.smk, or by script:)
with job_logging(sm.log[0], sm.config.get("verbose", False)):
    write_report(Path("."), Path(sm.output.html), [Path(p) for p in sm.input.receipts], dict(sm.config))
