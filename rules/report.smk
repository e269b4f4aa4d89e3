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
    log:
        "logs/make_report.log",
    run:
        run_script("make_report", input=input, output=output, params=params, log=log, threads=threads)
