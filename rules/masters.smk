rule build_master:
    input:
        unpack(INPUTS.master_inputs),
    output:
        master="masters/{master}.fits",
    params:
        entry=INPUTS.master_entry,
        memory_budget=config["stacking"]["memory_budget_mb"] * 1024**2,
    resources:
        mem_mb=INPUTS.master_mem_mb,
        runtime=INPUTS.master_runtime,
    log:
        "logs/build_master/{master}.log",
    run:
        run_script("build_master", input=input, output=output, params=params, log=log, threads=threads)
