"""Workflow adapter: write report.html, the self-contained HTML report of the run."""

from pathlib import Path

from imgproc.report import write_report
from imgproc.stages import configure_logging

sm = snakemake  # noqa: F821  (injected by Snakemake)
configure_logging(sm.log[0], sm.config.get("verbose", False))
write_report(Path("."), Path(sm.output.html), [Path(p) for p in sm.input.receipts], dict(sm.config))
