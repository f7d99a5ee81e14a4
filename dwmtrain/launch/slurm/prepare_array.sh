#!/bin/bash
# Submit prepare-data of a large pool as a SLURM job array of N parts and the merge that waits for them (afterok):
#   launchers/slurm/prepare_array.sh [--sbatch "OPTIONS"] N OUT TOKENIZER INPUT... [prepare-data options]
#   launchers/slurm/prepare_array.sh --sbatch "--cpus-per-task=32 --time=12:00:00" 256 /data/sp-1024 \
#       /data/tok.model /data/slimpajama/train --seq-len 1024
# Prints the job ids, how to follow the parts (prepare-data --status) and how to rerun one part.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OPTS=""
if [[ ${1:-} == --sbatch ]]; then OPTS=$2; shift 2; fi
N=${1:?usage: prepare_array.sh [--sbatch OPTS] N OUT TOKENIZER INPUT... [prepare-data options]}
OUT=${2:?usage: prepare_array.sh [--sbatch OPTS] N OUT TOKENIZER INPUT...}
shift 2
LOG="$OUT.slurm"   # not under OUT.parts/, which the merge removes
mkdir -p "$LOG"
# shellcheck disable=SC2086  # the option string is word-split on purpose
parts=$(sbatch --parsable $OPTS --array="0-$((N - 1))" --output="$LOG/part-%a-%A.out" "$HERE/prepare.sbatch" \
        "$N" "$OUT" "$@")
# shellcheck disable=SC2086
merge=$(sbatch --parsable $OPTS --dependency="afterok:$parts" --output="$LOG/merge-%j.out" "$HERE/prepare.sbatch" \
        merge "$OUT" "$@")
echo "parts: job array $parts (tasks 0-$((N - 1))); merge: job $merge (after all parts succeed)"
echo "follow:  dwmtrain data-status $OUT   logs: $LOG/"
echo "rerun a failed part I:  sbatch $OPTS --array=I --output=$LOG/part-%a-%A.out $HERE/prepare.sbatch $N $OUT $*"
echo "$parts,$merge" > "$LOG/jobs.txt"
