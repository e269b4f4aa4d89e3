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
        columns=LAYOUT.table_columns("manifest"),
    threads: workflow.cores
    resources:
        mem_mb=1000,
    log:
        "logs/scan_headers.log",
    run:
        run_script("scan_headers", input=input, output=output, params=params, log=log, threads=threads)


checkpoint plan_frames:
    input:
        manifest="work/manifest.tsv",
    output:
        plan="work/plan.tsv",
        masters="work/masters.tsv",
    params:
        settings=LAYOUT.plan_params(),
        columns=LAYOUT.table_columns("plan", "masters"),
    log:
        "logs/plan_frames.log",
    run:
        run_script("plan_frames", input=input, output=output, params=params, log=log, threads=threads)


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
    log:
        "logs/summarize.log",
    run:
        run_script("summarize", input=input, output=output, params=params, log=log, threads=threads)
