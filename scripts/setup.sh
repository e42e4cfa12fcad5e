#!/usr/bin/env bash
# Sets up a fresh machine for μ0: system libraries (apt, as root), a virtual environment in
# .venv, and the package with its simulation, camera and development extras.
# Safe to re-run: it does nothing when the environment is already up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${MU0_VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${MU0_EXTRAS:-sim,real,ray,dev}

# System libraries: headless OpenGL for MuJoCo (EGL, OSMesa), libusb for pyrealsense2.
APT_PACKAGES=(libegl1 libgl1 libosmesa6 libglib2.0-0 libusb-1.0-0)
missing=()
if command -v dpkg >/dev/null 2>&1; then
  for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] apt: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "[setup] warning: missing system packages ${missing[*]} (install them as root for rendering/cameras)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

# CPU machines pin the local CPU build of torch; an unpinned torch pulls several GB of CUDA
# wheels. Machines with an NVIDIA driver keep whatever CUDA torch pip chooses.
constraints=(-c constraints/cpu.txt)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  constraints=(-c constraints/gpu.txt)
fi

stamp="$VENV/.mu0-setup-stamp"
want=$(cat pyproject.toml constraints/*.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)-$EXTRAS
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing mu0[$EXTRAS] into $VENV (a few minutes the first time)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${constraints[@]}" -e ".[$EXTRAS]"
echo "$want" > "$stamp"
echo "[setup] done"
