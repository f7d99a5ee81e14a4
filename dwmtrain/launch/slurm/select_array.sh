#!/bin/bash
# Submit dwmtrain select over a large pool as a SLURM job array of N parts and the merge that waits for them
# (afterok); DSIR gets the array twice (scan, then weights), the other methods once:
#   launchers/slurm/select_array.sh [--sbatch "OPTIONS"] N METHOD SELECT-ARGS...
#   launchers/slurm/select_array.sh --sbatch "--time=4:00:00" 256 dsir --input /data/slimpajama/train \
#       --out /data/sel/dsir.jsonl.zst --shard-docs 1000000 --target-domains RedPajamaWikipedia,RedPajamaBook \
#       --budget-tokens 30000000000 --tokenizer /data/tok.model
# Prints the job ids, how to follow the parts (dwmtrain data-status OUT) and how to rerun one part.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OPTS=""
if [[ ${1:-} == --sbatch ]]; then OPTS=$2; shift 2; fi
N=${1:?usage: select_array.sh [--sbatch OPTS] N METHOD SELECT-ARGS...}
METHOD=${2:?usage: select_array.sh [--sbatch OPTS] N METHOD SELECT-ARGS...}
shift 2
OUT=""
args=("$@")
for ((k = 0; k < ${#args[@]}; k++)); do
  [[ ${args[k]} == --out && $((k + 1)) -lt ${#args[@]} ]] && OUT=${args[k + 1]}
  [[ ${args[k]} == --out=* ]] && OUT=${args[k]#--out=}
done
[[ -n $OUT ]] || { echo "select_array.sh: --out OUT.jsonl[.zst] is needed" >&2; exit 2; }
LOG="${OUT%.zst}"; LOG="${LOG%.jsonl}.slurm"   # beside NAME.parts/
mkdir -p "$LOG"
# shellcheck disable=SC2086  # the option string is word-split on purpose
scan=$(sbatch --parsable $OPTS --array="0-$((N - 1))" --output="$LOG/scan-%a-%A.out" "$HERE/select.sbatch" \
       "$N" "$METHOD" "$@")
after=$scan
jobs="$scan"
if [[ $METHOD == dsir ]]; then
  # shellcheck disable=SC2086
  after=$(sbatch --parsable $OPTS --dependency="afterok:$scan" --array="0-$((N - 1))" \
          --output="$LOG/weights-%a-%A.out" "$HERE/select.sbatch" "$N" "$METHOD" "$@")
  jobs="$jobs,$after"
  echo "scan: job array $scan; weights: job array $after (after every scan succeeds)"
fi
# shellcheck disable=SC2086
merge=$(sbatch --parsable $OPTS --dependency="afterok:$after" --output="$LOG/merge-%j.out" "$HERE/select.sbatch" \
        merge "$METHOD" "$@")
echo "parts: job array $scan (tasks 0-$((N - 1))); merge: job $merge (after all parts succeed)"
echo "follow:  dwmtrain data-status $OUT   logs: $LOG/"
echo "rerun a failed part I:  sbatch $OPTS --array=I --output=$LOG/scan-%a-%A.out $HERE/select.sbatch $N $METHOD $*"
echo "  (the steps after it wait on the failed job: submit them again, or rerun this script: complete parts are"
echo "  skipped; DSIR: every part's weights need every part's scan)"
echo "$jobs,$merge" > "$LOG/jobs.txt"
