#!/usr/bin/env bash
# Reproduces the shipped tiny checkpoints from scratch on this machine (CPU):
#   1. data:  collect scripted demonstrations in simulation (train seeds 0+; `collect`) and
#             extract traces from pixels (TraceExtract; `extract`), JOBS pairs at a time, resumably;
#   2. train: pretrain μ0 (uniform C2 knots), the Bézier-knot ablation and two baselines;
#   3. eval:  evaluate everything on the held-out set (`mu0 eval-traces` builds it: seeds 1000+,
#             the Door task and the IIWA robot, neither of which pretraining sees).
# Usage: scripts/make_checkpoints.sh [collect|extract|data|train|eval|all]   (default: all)
set -euo pipefail
# One torch thread per process: on a busy 2-core machine more threads thrash (10-50x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$(dirname "$0")/.."
MU0=${MU0:-.venv/bin/mu0}
DATA=${DATA:-data}
RUNS=${RUNS:-runs}
# Episodes per pair by task (multi-phase tasks need more), or per pair as
# EPISODES_<Task>_<Robot> (e.g. EPISODES_PickPlaceCan_UR5e=8).
# The defaults are what the shipped checkpoints were trained on (docs/world-model.md).
EPISODES_Lift=${EPISODES_Lift:-6}
EPISODES_Lift_UR5e=${EPISODES_Lift_UR5e:-4}
EPISODES_Stack=${EPISODES_Stack:-12}
EPISODES_Stack_UR5e=${EPISODES_Stack_UR5e:-20}
EPISODES_PickPlaceCan=${EPISODES_PickPlaceCan:-12}
JOBS=${JOBS:-2}
STEPS=${STEPS:-2500}
# The tokens baseline trains about 8x slower a step on CPU.
TOKEN_STEPS=${TOKEN_STEPS:-500}
# Half of each training sample's point slots go first to points that move.
MOVING_SHARE=${MOVING_SHARE:-0.5}
SIZE=${SIZE:-128}
STAGE=${1:-all}
# More pairs (PickPlaceCan-UR5e, Lift-Kinova3, Stack-Kinova3, ...) are one word each here; the
# shipped checkpoints were trained on these five (CPU time ran out for the others).
PAIRS=${PAIRS:-"Stack-UR5e Stack-Panda PickPlaceCan-Panda Lift-Panda Lift-UR5e"}

collect_pair() {  # both stages resume: finished episodes are kept and skipped
  local pair=$1 task=${1%-*} robot=${1#*-} n m
  n=EPISODES_${task}_${robot} m=EPISODES_$task
  "$MU0" collect --out "$DATA/episodes/train/$pair" --task "$task" --robot "$robot" \
    --episodes "${!n:-${!m:-8}}" --seed 0 --image-size "$SIZE" "$SIZE" --only-success --quiet
}
extract_pair() {  # a sample every STRIDE frames: neighbours are near-copies
  "$MU0" extract "$DATA/episodes/train/$1" --out "$DATA/traces/train/$1" --workers 1 \
    --stride "${STRIDE:-2}" --quiet
}
export -f collect_pair extract_pair
export MU0 DATA SIZE STRIDE ${!EPISODES_*}

if [[ $STAGE == collect || $STAGE == data || $STAGE == all ]]; then
  printf '%s\n' $PAIRS | xargs -P "$JOBS" -I{} bash -c 'collect_pair {}'
fi
if [[ $STAGE == extract || $STAGE == data || $STAGE == all ]]; then
  printf '%s\n' $PAIRS | xargs -P "$JOBS" -I{} bash -c 'extract_pair {}'
fi

if [[ $STAGE == train || $STAGE == all ]]; then
  train=()
  for pair in $PAIRS; do train+=("$DATA/traces/train/$pair"); done
  # Frozen-encoder features are the same for all four runs: one shared cache.
  common=(--data "${train[@]}" --steps "$STEPS" --batch-size 16 --max-points 32 --eval-every 500
    --save-every 500 --feature-cache "$RUNS/feature_cache" --moving-share "$MOVING_SHARE")
  "$MU0" pretrain "${common[@]}" --out "$RUNS/tiny"
  "$MU0" pretrain "${common[@]}" --out "$RUNS/tiny-bezier" --knots bezier
  "$MU0" pretrain "${common[@]}" --out "$RUNS/tiny-regression" --objective regression
  "$MU0" pretrain "${common[@]}" --steps "$TOKEN_STEPS" --out "$RUNS/tiny-tokens" --objective tokens
  for name in tiny tiny-bezier tiny-regression tiny-tokens; do
    rm -rf "checkpoints/$name" && mkdir -p checkpoints && cp -r "$RUNS/$name/final" "checkpoints/$name"
  done
fi

if [[ $STAGE == eval || $STAGE == all ]]; then
  "$MU0" eval-traces --max-batches 20 --samples-k 0 --json outputs/eval_traces.json
fi
