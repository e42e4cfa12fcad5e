# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both install what is missing first (scripts/setup.sh).
PY := .venv/bin/python
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-all lint format bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m runtime.cli info
	$(PY) -m runtime.cli demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q -m "not slow and not gpu" -n 2 --dist loadfile

test-all: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .
