#!/usr/bin/env bash
# Reproduces the shipped tiny checkpoints from scratch on this machine (CPU):
#   1. collect scripted demonstrations in simulation (train seeds; held-out seeds, task, robot),
#   2. extract traces from pixels (TraceExtract),
#   3. pretrain μ0 (uniform C2 knots), the Bézier-knot ablation and two baselines,
#   4. evaluate everything on the held-out splits.
# Door (a task) and IIWA (a robot) are left out of pretraining entirely.
set -euo pipefail
cd "$(dirname "$0")/.."
MU0=${MU0:-.venv/bin/mu0}
DATA=${DATA:-data}
RUNS=${RUNS:-runs}
EPISODES=${EPISODES:-3}
HELDOUT_EPISODES=${HELDOUT_EPISODES:-2}
STEPS=${STEPS:-1500}
SIZE=${SIZE:-128}

collect_extract() {  # split task robot episodes seed
  local split=$1 task=$2 robot=$3 n=$4 seed=$5
  "$MU0" collect --out "$DATA/episodes/$split/$task-$robot" --task "$task" --robot "$robot" \
    --episodes "$n" --seed "$seed" --image-size "$SIZE" "$SIZE" --only-success --quiet
  "$MU0" extract "$DATA/episodes/$split/$task-$robot" --out "$DATA/traces/$split/$task-$robot" --workers 1 --quiet
}

for task in Lift Stack PickPlaceCan; do
  for robot in Panda UR5e Kinova3; do
    collect_extract train "$task" "$robot" "$EPISODES" 0
    collect_extract heldout_seeds "$task" "$robot" "$HELDOUT_EPISODES" 1000
  done
done
for robot in Panda UR5e; do collect_extract heldout_task Door "$robot" "$HELDOUT_EPISODES" 1000; done
for task in Lift Stack; do collect_extract heldout_robot "$task" IIWA "$HELDOUT_EPISODES" 1000; done

train=$(ls -d "$DATA"/traces/train/*)
common=(--data $train --steps "$STEPS" --batch-size 16 --max-points 32 --eval-every 250 --save-every 500)
"$MU0" pretrain "${common[@]}" --out "$RUNS/tiny"
"$MU0" pretrain "${common[@]}" --out "$RUNS/tiny-bezier" --knots bezier
"$MU0" pretrain "${common[@]}" --out "$RUNS/tiny-regression" --objective regression
"$MU0" pretrain "${common[@]}" --out "$RUNS/tiny-tokens" --objective tokens
for name in tiny tiny-bezier tiny-regression tiny-tokens; do
  rm -rf "checkpoints/$name" && mkdir -p checkpoints && cp -r "$RUNS/$name/final" "checkpoints/$name"
done
"$MU0" eval-traces --data "$DATA/traces" --json outputs/eval_traces.json
