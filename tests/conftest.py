"""Shared fixtures. Tests run on CPU; the `tiny` model is built once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_config():
    from configs import get_model_config

    return get_model_config("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """A randomly initialised tiny μ0 (packaged encoders are real). Do not train it in place."""
    from mu0_core.model import Mu0

    torch.manual_seed(0)
    return Mu0(tiny_config).eval()
