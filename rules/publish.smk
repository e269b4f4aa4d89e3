rule publish_batch:
    input:
        receipts=INPUTS.publish_inputs,
    output:
        receipt="work/published/{pub_batch}.json",
    params:
        entries=INPUTS.publish_entries,
        references=INPUTS.publish_references,
        settings=LAYOUT.stack_params(),
    threads: INPUTS.publish_threads(workflow.cores)
    priority: INPUTS.publish_priority
    resources:
        mem_mb=INPUTS.publish_mem_mb,
        runtime=INPUTS.publish_runtime,
    log:
        "logs/publish/{pub_batch}.log",
    run:
        run_script("publish_batch", input=input, output=output, params=params, log=log, threads=threads)
