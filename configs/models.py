"""Model presets: one code path, three sizes.

- ``tiny``: packaged frozen encoders (EfficientNet-Lite0, all-MiniLM-L6-v2), a 4-layer expert
  of width 128. Runs and trains on a laptop CPU; the default for tests and the demo.
- ``small``: SmolVLM2-256M cut to its first 16 text layers, expert at half width.
- ``paper``: the published μ0's own architecture at the release's sizes (SmolVLM2-2.2B cut to
  20 text layers, a 20-layer half-width cross-attending expert, depth LoRA, DINOv2-base; see
  ``mu0_core/published/preset.py``), random weights built offline for parameter counts and
  latency. The trained model is the release itself: ``mu0 serve --checkpoint RELEASE_DIR``
  (docs/published-mu0.md). It is inference-only: our trainer takes ``tiny`` and ``small``.

``small`` reads weights from a local directory (``--model-dir`` or ``dataclasses.replace``);
without one it builds the architecture with random weights, which is what benchmarks need.
"""

from __future__ import annotations

import dataclasses

from configs.registry import Registry
from mu0_core.config import ExpertConfig, HFBackboneConfig, Mu0Config, TinyBackboneConfig
from mu0_core.published.config import PublishedPreset

MODEL_PRESETS: Registry[Mu0Config | PublishedPreset] = Registry("model")


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


def _paper() -> PublishedPreset:
    return PublishedPreset(name="paper")


MODEL_PRESETS.register("tiny", _tiny)
MODEL_PRESETS.register("small", _small)
MODEL_PRESETS.register("paper", _paper)


def get_model_config(name: str, model_dir: str | None = None) -> Mu0Config | PublishedPreset:
    cfg = MODEL_PRESETS.get(name)
    if is_published(cfg) and model_dir is not None:
        raise ValueError(
            f"preset {name!r} is the published μ0's architecture with random weights; it takes no "
            "model_dir. Serve the release: mu0 serve --checkpoint RELEASE_DIR --vlm-dir DIR "
            "--dino-dir DIR (docs/published-mu0.md)"
        )
    if model_dir is not None:
        if cfg.backbone.kind != "hf":
            raise ValueError(f"preset {name!r} uses packaged encoders; it takes no model_dir")
        cfg = cfg.replace(backbone=dataclasses.replace(cfg.backbone, model_dir=str(model_dir)))
    return cfg


def is_published(cfg) -> bool:
    """True for the published-μ0 architecture (``paper``), which our trainer and Mu0 do not build."""
    return getattr(cfg, "kind", None) == "published"


def trainable_config(name: str, model_dir: str | None = None) -> Mu0Config:
    """A preset our own model (``Mu0``) builds; the published architecture is refused by name."""
    cfg = get_model_config(name, model_dir)
    if is_published(cfg):
        raise SystemExit(
            f"preset {name!r} is the published μ0's architecture (inference only, random weights "
            "here): use tiny or small, or serve a release with --checkpoint RELEASE_DIR "
            "(docs/published-mu0.md)"
        )
    return cfg


def list_model_presets() -> list[str]:
    return MODEL_PRESETS.names()
