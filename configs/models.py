"""Model presets: one code path, three sizes.

- ``tiny``: packaged frozen encoders (EfficientNet-Lite0, all-MiniLM-L6-v2), a 4-layer expert
  of width 128. Runs and trains on a laptop CPU; the default for tests and the demo.
- ``small``: SmolVLM2-256M cut to its first 16 text layers, expert at half width.
- ``paper``: SmolVLM2-2.2B cut to its first 20 text layers, vision frozen, expert at half
  width (1024) with one expert layer per kept VLM layer, as pi0-style experts do.

The VLM presets read weights from a local directory (``--model-dir`` or
``dataclasses.replace``); without one they build the architecture with random weights, which
is what benchmarks of latency need.
"""

from __future__ import annotations

import dataclasses

from configs.registry import Registry
from mu0_core.config import ExpertConfig, HFBackboneConfig, Mu0Config, TinyBackboneConfig

MODEL_PRESETS: Registry[Mu0Config] = Registry("model")


def _tiny() -> Mu0Config:
    return Mu0Config(
        name="tiny",
        backbone=TinyBackboneConfig(),
        expert=ExpertConfig(width=128, layers=4, heads=4),
    )


def _small() -> Mu0Config:
    return Mu0Config(
        name="small",
        backbone=HFBackboneConfig(architecture="smolvlm2-256m", num_layers=16),
        expert=ExpertConfig(width=288, layers=16, heads=6),
    )


def _paper() -> Mu0Config:
    return Mu0Config(
        name="paper",
        backbone=HFBackboneConfig(architecture="smolvlm2-2.2b", num_layers=20),
        expert=ExpertConfig(width=1024, layers=20, heads=16),
    )


MODEL_PRESETS.register("tiny", _tiny)
MODEL_PRESETS.register("small", _small)
MODEL_PRESETS.register("paper", _paper)


def get_model_config(name: str, model_dir: str | None = None) -> Mu0Config:
    cfg = MODEL_PRESETS.get(name)
    if model_dir is not None:
        if cfg.backbone.kind != "hf":
            raise ValueError(f"preset {name!r} uses packaged encoders; it takes no model_dir")
        cfg = cfg.replace(backbone=dataclasses.replace(cfg.backbone, model_dir=str(model_dir)))
    return cfg


def list_model_presets() -> list[str]:
    return MODEL_PRESETS.names()
