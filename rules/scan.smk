# Bookkeeping rules run on the submitting host, never as cluster jobs.
localrules:
    scan_headers,
    plan_frames,
    summarize,


rule scan_headers:
    input:
        frames=LAYOUT.input_files(),
    output:
        manifest="work/manifest.tsv",
    params:
        request=LAYOUT.scan_params(),
    threads: workflow.cores
    resources:
        mem_mb=1000,
    conda:
        "../envs/scan.yaml"
    log:
        "logs/scan_headers.log",
    script:
        "../scripts/scan_headers.py"


checkpoint plan_frames:
    input:
        manifest="work/manifest.tsv",
    output:
        plan="work/plan.tsv",
        masters="work/masters.tsv",
    params:
        settings=LAYOUT.plan_params(),
    conda:
        "../envs/scan.yaml"
    log:
        "logs/plan_frames.log",
    script:
        "../scripts/plan_frames.py"


rule summarize:
    input:
        manifest="work/manifest.tsv",
        plan="work/plan.tsv",
        masters_table="work/masters.tsv",
        receipts=INPUTS.all_receipts,
        masters=INPUTS.built_masters,
    output:
        json="summary.json",
        text="summary.txt",
    conda:
        "../envs/scan.yaml"
    log:
        "logs/summarize.log",
    script:
        "../scripts/summarize.py"
