# Snakemake front end of the DVC pipeline. dvc.yaml declares the stages; this file only mirrors
# them (one rule per DVC stage) and runs each as `dvc repro --single-item`, so both tools build
# the same outputs and dvc.lock stays the one record of what is up to date.
#
#   snakemake --cores all results/ablation_table.csv
#   snakemake --profile profiles/slurm results/ablation_table.csv

from ntkattn.study.config import check_datasets, load_study
from ntkattn.study.dvc_bridge import load_resources, read_stages, touch_sentinel

# Validate params.yaml before any rule is defined, so a typo stops here with a clear message.
_study = load_study("params.yaml")
# Data set names are checked only where the DAG is planned: each cluster job re-reads this file.
if workflow.is_main_process:
    check_datasets(_study)
STUDY = _study.name
# Only the main process decides what is stale. A cluster job re-reads this file to run one given
# stage; asking DVC for the status there again would cost seconds per job and could touch sentinels
# while other jobs run.
STAGES = read_stages(".", with_status=workflow.is_main_process)
RESOURCES = load_resources(STUDY)
PRODUCER = {out: stage for stage in STAGES for out in stage.outs}


def _outputs(stage):
    return [directory(o) if is_dir else o for o, is_dir in zip(stage.outs, stage.out_is_dir)]


def _inputs(stage):
    upstream = [o for s in STAGES if s.name in stage.upstream for o in s.outs]
    return upstream + ([touch_sentinel(stage)] if stage.stale else [])


for _stage in STAGES:
    _res = RESOURCES.get(_stage.group, {})

    rule:
        name: _stage.rule_name
        input: _inputs(_stage)
        output: _outputs(_stage)
        params: stage=_stage.name
        log: f"logs/{_stage.rule_name}.log"
        localrule: not _stage.stale
        threads: _res.get("threads", 1)
        # Names as the SLURM executor reads them (`gpu` becomes sbatch --gpus). Every key is
        # always set ("" = cluster default) so the cluster-generic submit template can name it.
        resources:
            mem_mb=_res.get("mem_mb", 4000),
            runtime=_res.get("runtime", 60),
            gpu=_res.get("gpu", 0),
            slurm_partition=_res.get("slurm_partition", ""),
            slurm_extra=_res.get("slurm_extra", ""),
        shell: "dvc --wait-for-lock repro --single-item {params.stage:q} > {log:q} 2>&1"
