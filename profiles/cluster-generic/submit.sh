#!/usr/bin/env bash
# Submit one Snakemake job script to SLURM and print the job id (what Snakemake expects).
#
#   submit.sh --name RULE --threads N --mem-mb MIB --runtime MIN --gpu N \
#             --partition NAME --extra "SBATCH FLAGS" JOBSCRIPT
#
# An empty partition means the cluster's default; --gpu 0 requests no GPU.
set -euo pipefail

name=job threads=1 mem_mb=4000 runtime=60 gpu=0 partition="" extra=""
while [ $# -gt 1 ]; do
  case "$1" in
    --name) name=$2 ;;
    --threads) threads=$2 ;;
    --mem-mb) mem_mb=$2 ;;
    --runtime) runtime=$2 ;;
    --gpu) gpu=$2 ;;
    --partition) partition=$2 ;;
    --extra) extra=$2 ;;
    *) echo "submit.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift 2
done
jobscript=$1

logdir=.snakemake/cluster-generic-logs
mkdir -p "$logdir"
args=(--parsable --job-name "smk-$name" --output "$logdir/$name-%j.log"
      --cpus-per-task "$threads" --mem "$mem_mb" --time "$runtime")
[ "$gpu" != 0 ] && args+=(--gpus "$gpu")
[ -n "$partition" ] && args+=(--partition "$partition")
# shellcheck disable=SC2206  # extra holds several flags on purpose
[ -n "$extra" ] && args+=($extra)

# --parsable prints "id" or "id;cluster".
sbatch "${args[@]}" "$jobscript" | cut -d';' -f1
