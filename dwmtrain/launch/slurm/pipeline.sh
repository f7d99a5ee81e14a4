#!/bin/bash
# Submit a whole T-stage bi-level run to SLURM as one dependency chain:
#   stage 1 job -> meta job (DWM of stage 2) -> stage 2 job -> ... -> meta job (stage T) -> stage T job
# Each stage job resumes from the sharded checkpoint and stops at its stage's end (meta.launch=external,
# recorded by SLURM as COMPLETED); a job stopped for its time limit requeues itself and the chain waits.
#
#   launchers/slurm/pipeline.sh [--train "SBATCH OPTIONS"] [--meta "SBATCH OPTIONS"] CONFIG RUN_DIR [key=value ...]
#   launchers/slurm/pipeline.sh --train "--nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --time=24:00:00" \
#       --meta "--gpus-per-node=8 --time=4:00:00" paper_370m /ckpt/run1
#
# Each meta job asks for meta.nodes nodes of meta.nproc tasks (--meta "--nodes=..." overrides). Prints the job ids and how to
# follow and cancel the chain. DWMTRAIN_PYTHON selects the interpreter.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TRAIN_OPTS="" META_OPTS=""
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --train) TRAIN_OPTS=$2; shift 2 ;;
    --meta) META_OPTS=$2; shift 2 ;;
    *) echo "pipeline.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
CONFIG=${1:?usage: pipeline.sh [--train OPTS] [--meta OPTS] CONFIG RUN_DIR [key=value ...]}
RUN_DIR=${2:?usage: pipeline.sh [--train OPTS] [--meta OPTS] CONFIG RUN_DIR [key=value ...]}
shift 2
PYTHON=${DWMTRAIN_PYTHON:-python3}
export DWMTRAIN_PYTHON=$PYTHON
# the resolved config decides the stages (and refuses a bad config before anything is submitted)
STAGES=$("$PYTHON" -m dwmtrain config --config "$CONFIG" "$@" meta.launch=external --get stages.num_stages)
MODE=$("$PYTHON" -m dwmtrain config --config "$CONFIG" "$@" --get meta.mode)
META_NODES=$("$PYTHON" -m dwmtrain config --config "$CONFIG" "$@" --get meta.nodes)
META_NPROC=$("$PYTHON" -m dwmtrain config --config "$CONFIG" "$@" --get meta.nproc)
[[ $MODE == bilevel ]] || STAGES=1   # without meta-updates the run is one job
mkdir -p "$RUN_DIR"
LOG="$RUN_DIR/slurm"
mkdir -p "$LOG"
ids=() dep=""
for ((k = 1; k <= STAGES; k++)); do
  # shellcheck disable=SC2086  # the option strings are word-split on purpose
  jid=$(sbatch --parsable $TRAIN_OPTS ${dep:+--dependency=afterok:$dep} --job-name="dwm-stage$k" \
        --output="$LOG/stage$k-%j.out" "$HERE/pretrain.sbatch" "$CONFIG" "$RUN_DIR" meta.launch=external "$@")
  ids+=("$jid"); dep=$jid
  echo "stage $k training: job $jid"
  if ((k < STAGES)); then
    # shellcheck disable=SC2086
    jid=$(sbatch --parsable --nodes="$META_NODES" --ntasks-per-node="$META_NPROC" $META_OPTS --dependency=afterok:$dep --job-name="dwm-meta$((k + 1))" \
          --output="$LOG/meta$((k + 1))-%j.out" "$HERE/meta_update.sbatch" "$RUN_DIR" $((k + 1)))
    ids+=("$jid"); dep=$jid
    echo "stage $((k + 1)) meta-update: job $jid"
  fi
done
all=$(IFS=,; echo "${ids[*]}")
echo "submitted ${#ids[@]} jobs: $all"
echo "follow:  squeue -j $all    logs: $LOG/    progress: dwmtrain report $RUN_DIR"
echo "cancel:  scancel $all"
echo "$all" > "$LOG/chain.txt"
