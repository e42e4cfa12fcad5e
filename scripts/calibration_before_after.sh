#!/usr/bin/env bash
# The before/after figures of docs/calibration.md: the hand-eye solver of a base commit
# (default 171634e, before issue 26) against this checkout's, on the same known-truth
# cases (`mu0 bench calibration --sweep`) and on the simulated rig with two wrong robot
# poses (view 3 moved 2 cm, view 11 turned 5°). Usage: scripts/calibration_before_after.sh [BASE] [SEEDS]
set -euo pipefail
base=${1:-171634e}
seeds=${2:-10}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
old=$tmp/old
mkdir -p "$old" "$tmp/run"
git -C "$repo" archive "$base" calibration | tar -x -C "$old"
cp "$repo/calibration/synthetic.py" "$old/calibration/"  # the cases, not the solver
export MUJOCO_GL=${MUJOCO_GL:-egl} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for side in before after; do
  echo "== $side: sweep"
  path=$([ $side = before ] && echo "$old:$repo" || echo "$repo")
  # From an empty directory: python -m puts the working directory first on the path.
  (cd "$tmp/run" && PYTHONPATH=$path "$py" -m runtime.cli bench calibration --sweep --seeds "$seeds" || true)
  echo "== $side: simulated rig, 20 poses, views 3 (2 cm) and 11 (5°) wrong"
  for s in 0 1 2 3 4; do
    (cd "$tmp/run" && PYTHONPATH=$path "$py" -m runtime.cli bench calibration --eye-in-hand \
      --seed "$s" --bad 3:0.02:0 --bad 11:0:5 2>&1 | grep -v '^\[' || true)
  done
done
