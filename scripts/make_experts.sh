#!/usr/bin/env bash
# Reproduces the shipped action experts (checkpoints/experts/<Robot>) on this machine (CPU):
#   1. data:  scripted demonstrations: 12 per task on seeds 100+, and 40 more of Lift on seeds
#             200+ (never seen by μ0's pretraining, seeds 0+; nor by eval-policy, seeds 5000+);
#   2. train: `mu0 train-expert` per robot against the frozen shipped μ0 (checkpoints/tiny):
#             the traces it learns from are μ0's predictions on those recordings;
#   3. eval:  `mu0 eval-policy` on seeds 5000+, conditions mu0, no_trace and oracle.
# Usage: scripts/make_experts.sh [data|train|eval|all]   (default: all)
set -euo pipefail
# One torch thread per process: on a busy 2-core machine more threads thrash (10-50x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$(dirname "$0")/.."
MU0=${MU0:-.venv/bin/mu0}
DATA=${DATA:-data}
RUNS=${RUNS:-runs}
EPISODES=${EPISODES:-12}
LIFT_EXTRA=${LIFT_EXTRA:-40}
STEPS=${STEPS:-8000}
EVAL_EPISODES=${EVAL_EPISODES:-50}
TASKS=${TASKS:-"Lift Stack"}
ROBOTS=${ROBOTS:-"Panda UR5e"}
STAGE=${1:-all}

if [[ $STAGE == data || $STAGE == all ]]; then
  for robot in $ROBOTS; do
    for task in $TASKS; do
      "$MU0" collect --out "$DATA/episodes/expert/$task-$robot" --task "$task" --robot "$robot" \
        --episodes "$EPISODES" --seed 100 --image-size 128 128 --only-success --quiet
    done
    if [[ $LIFT_EXTRA -gt 0 ]]; then
      "$MU0" collect --out "$DATA/episodes/expert40/Lift-$robot" --task Lift --robot "$robot" \
        --episodes "$LIFT_EXTRA" --seed 200 --image-size 128 128 --only-success --quiet
    fi
  done
fi

if [[ $STAGE == train || $STAGE == all ]]; then
  for robot in $ROBOTS; do
    data=()
    for task in $TASKS; do
      data+=("$DATA/episodes/expert/$task-$robot")
      if [[ $task == Lift && $LIFT_EXTRA -gt 0 ]]; then data+=("$DATA/episodes/expert40/Lift-$robot"); fi
    done
    "$MU0" train-expert --robot "$robot" --data "${data[@]}" --checkpoint checkpoints/tiny \
      --out "$RUNS/expert-$robot" --steps "$STEPS" --batch-size 64
    rm -rf "checkpoints/experts/$robot" && mkdir -p checkpoints/experts
    cp -r "$RUNS/expert-$robot/final" "checkpoints/experts/$robot"
  done
fi

if [[ $STAGE == eval || $STAGE == all ]]; then
  tasks=$(echo $TASKS | tr ' ' ,) robots=$(echo $ROBOTS | tr ' ' ,)
  "$MU0" eval-policy --tasks "$tasks" --robots "$robots" --episodes "$EVAL_EPISODES" \
    --json outputs/eval_policy.json
fi
