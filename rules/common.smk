# Setup shared by all rules: config validation, the working folder, and the input functions
# that turn the plan (work/plan.tsv, written by the plan_frames checkpoint) into batch jobs.
import os
import sys

from snakemake.utils import validate

validate(config, schema=os.path.join(workflow.basedir, "schemas", "config.schema.yaml"))

# In a source checkout the imgproc package sits beside the Snakefile; Snakemake hands this
# search path on to every script job.
sys.path.insert(0, workflow.basedir)
from imgproc.dag import Layout, WorkflowInputs  # noqa: E402

LAYOUT = Layout(config)


workdir: config["output_dir"]


INPUTS = WorkflowInputs(LAYOUT, lambda: checkpoints.plan_frames.get().output)


wildcard_constraints:
    cal_batch=r"c\d{4}",
    pub_batch=r"p\d{4}",
    master=r"master_[^/]+",
