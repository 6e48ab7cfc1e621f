#!/usr/bin/env bash
# Print the state of one SLURM job as Snakemake's cluster-generic executor wants it:
# running, success or failed.
#
#   status.sh JOBID
set -uo pipefail
jobid=$1

state=$(sacct -j "$jobid" -X --noheader --parsable2 --format=JobIdRaw,State 2>/dev/null \
        | awk -F'|' -v id="$jobid" '$1 == id {print $2; exit}')
if [ -z "$state" ]; then
  # Not in the accounting database yet (or accounting is off): ask the queue.
  state=$(squeue -j "$jobid" --noheader --format=%T 2>/dev/null | head -n1)
fi

case "${state%% *}" in  # "CANCELLED by 123" -> CANCELLED
  COMPLETED) echo success ;;
  ""|PENDING|CONFIGURING|RUNNING|COMPLETING|REQUEUED|RESIZING|SUSPENDED) echo running ;;
  *) echo failed ;;  # FAILED, TIMEOUT, PREEMPTED, OUT_OF_MEMORY...: Snakemake retries it
esac
