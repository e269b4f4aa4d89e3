"""Workflow adapter: scan the input headers into the manifest."""

from pathlib import Path

from imgproc.scan import ScanRequest
from imgproc.stages import job_logging, run_scan

sm = snakemake  # noqa: F821  (given by run_script in rules/common.smk, or by script:)
with job_logging(sm.log[0], sm.config.get("verbose", False)):
    params = sm.params.request
    request = ScanRequest(
        light_dir=Path(params["light_dir"]),
        master_dirs={role: Path(path) for role, path in params["master_dirs"].items()},
        keywords=params["keywords"],
        filter=params["filter"],
        exclude=[Path(path) for path in params["exclude"]],
        max_frame_bytes=params["max_frame_bytes"],
    )
    run_scan(request, Path(sm.output.manifest), Path("work/scan-cache.tsv"), workers=sm.threads)
