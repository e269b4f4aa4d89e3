# The HTML report of the run (thumbnails, per-light table, plots, master usage, config).
localrules:
    make_report,


rule make_report:
    input:
        summary="summary.json",
        manifest="work/manifest.tsv",
        plan="work/plan.tsv",
        receipts=INPUTS.all_receipts,
    output:
        html="report.html",
    conda:
        "../envs/scan.yaml"
    log:
        "logs/make_report.log",
    script:
        "../scripts/make_report.py"
