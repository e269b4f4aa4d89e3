rule calibrate_batch:
    input:
        unpack(INPUTS.calibrate_inputs),
    output:
        receipt="work/calibrated/{cal_batch}.json",
    priority: CALIBRATE_PRIORITY
    params:
        entries=INPUTS.calibrate_entries,
        observer=config["observer"],
        binning=config["bin"],
        # aligned to each sequence's best frame: every aligned light's stars are measured
        quality=config["align"] and config["alignment"]["reference"] == "best",
    resources:
        mem_mb=INPUTS.calibrate_mem_mb,
        runtime=INPUTS.calibrate_runtime,
    log:
        "logs/calibrate/{cal_batch}.log",
    run:
        run_script("calibrate_batch", input=input, output=output, params=params, log=log, threads=threads)
