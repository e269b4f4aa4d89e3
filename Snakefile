# imgproc: calibrate, bin, align and stack a night of FITS frames.
# Stages: scan_headers -> plan_frames (checkpoint) -> [build_master] -> calibrate_batch -> publish_batch
# -> summarize -> make_report.
# Run it through the `imgproc` command, or `snakemake --cores N --configfile OUT/imgproc.yaml`.
from snakemake.utils import min_version

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config.yaml")


include: "rules/common.smk"
include: "rules/scan.smk"
include: "rules/masters.smk"
include: "rules/calibrate.smk"
include: "rules/publish.smk"
include: "rules/report.smk"


rule all:
    input:
        "summary.json",
        "report.html",
    default_target: True


onstart:
    start_workers()


onsuccess:
    exit_promptly()


onerror:
    exit_promptly()
