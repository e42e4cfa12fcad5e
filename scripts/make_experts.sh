#!/usr/bin/env bash
# Reproduces the shipped action experts (checkpoints/experts/<Robot>) on this machine (CPU):
#   1. data:  scripted demonstrations: 12 each of Lift and Stack on seeds 100+, 40 more each of
#             Lift and Stack on seeds 200+, 40 of Door on seeds 100+ and 100 more of Stack on
#             seeds 300+ (seeds μ0's pretraining, 0+, and eval-policy, 5000+, never use);
#   2. train: `mu0 train-expert` per robot against the frozen shipped μ0 (checkpoints/tiny):
#             the traces it learns from are μ0's predictions on those recordings; the UR5e's
#             action head also reads the predicted segment goal, the Panda's does not
#             (TRAIN_ARGS_<Robot>: the Panda expert was trained before that option existed);
#   3. recover: recovery demonstrations (`mu0 collect --expert`): the expert of step 2 drives
#             Stack in closed loop with μ0's traces, the scripted demonstrator takes over at a
#             step drawn from 90..260 and finishes; then that robot's expert is trained again
#             on the demonstrations of step 1 plus these (RECOVERY: the UR5e's, 70 on seeds 700+);
#   4. eval:  `mu0 eval-policy` on seeds 5000+, conditions mu0, no_trace and oracle.
# Usage: scripts/make_experts.sh [data|train|recover|eval|all]   (default: all)
set -euo pipefail
# One torch thread per process: on a busy 2-core machine more threads thrash (10-50x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$(dirname "$0")/.."
MU0=${MU0:-.venv/bin/mu0}
DATA=${DATA:-data}
RUNS=${RUNS:-runs}
STEPS=${STEPS:-20000}
EVAL_EPISODES=${EVAL_EPISODES:-50}
ROBOTS=${ROBOTS:-"Panda UR5e"}
TRAIN_ARGS_Panda=${TRAIN_ARGS_Panda-"--no-goal-input"}
# Demonstration sets, "<folder>:<task>:<episodes>:<first seed>", one per robot each.
SETS=${SETS:-"expert:Lift:12:100 expert40:Lift:40:200 expert:Stack:12:100 expert40:Stack:40:200 expert40:Door:40:100 expert100:Stack:100:300"}
# Recovery sets, "<robot>:<task>:<episodes>:<first seed>".
RECOVERY=${RECOVERY-"UR5e:Stack:70:700"}
STAGE=${1:-all}
folders=() tasks=() episodes=() seeds=()
for set in $SETS; do
  IFS=: read -r folder task n seed <<<"$set"
  folders+=("$folder") tasks+=("$task") episodes+=("$n") seeds+=("$seed")
done

if [[ $STAGE == data || $STAGE == all ]]; then
  for robot in $ROBOTS; do
    for i in "${!folders[@]}"; do
      "$MU0" collect --out "$DATA/episodes/${folders[i]}/${tasks[i]}-$robot" --task "${tasks[i]}" \
        --robot "$robot" --episodes "${episodes[i]}" --seed "${seeds[i]}" --image-size 128 128 \
        --only-success --quiet
    done
  done
fi

# train_robot ROBOT RUN_DIR [MORE_DATA...]: the demonstration sets (+ MORE_DATA) -> the shipped
# expert (replaced only once the new one is fully copied).
train_robot() {
  local robot=$1 run=$2
  shift 2
  local data=()
  for i in "${!folders[@]}"; do data+=("$DATA/episodes/${folders[i]}/${tasks[i]}-$robot"); done
  local args_var="TRAIN_ARGS_$robot"
  local extra
  read -ra extra <<<"${!args_var:-}"
  "$MU0" train-expert --robot "$robot" --data "${data[@]}" "$@" --checkpoint checkpoints/tiny \
    --out "$run" --steps "$STEPS" --batch-size 64 "${extra[@]}"
  local dest="checkpoints/experts/$robot"
  mkdir -p checkpoints/experts && rm -rf "$dest.new"
  cp -r "$run/final" "$dest.new"
  rm -rf "$dest" && mv "$dest.new" "$dest"
}

if [[ $STAGE == train || $STAGE == all ]]; then
  for robot in $ROBOTS; do train_robot "$robot" "$RUNS/expert-$robot"; done
fi

if [[ $STAGE == recover || $STAGE == all ]]; then
  for set in $RECOVERY; do
    IFS=: read -r robot task n seed <<<"$set"
    out="$DATA/episodes/recovery/$task-$robot"
    "$MU0" collect --out "$out" --task "$task" --robot "$robot" --expert "checkpoints/experts/$robot" \
      --handover 90 260 --episodes "$n" --seed "$seed" --image-size 128 128 --only-success --quiet
    train_robot "$robot" "$RUNS/expert-$robot-recovery" "$out"
  done
fi

if [[ $STAGE == eval || $STAGE == all ]]; then
  task_list=$(printf '%s\n' "${tasks[@]}" | sort -u | paste -sd,)
  robots=$(echo $ROBOTS | tr ' ' ,)
  "$MU0" eval-policy --tasks "$task_list" --robots "$robots" --episodes "$EVAL_EPISODES" \
    --json outputs/eval_policy.json
fi
