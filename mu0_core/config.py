"""Model configuration: frozen dataclasses that round-trip through JSON (checkpoints store them).

Named presets (``tiny``, ``small``, ``paper``) live in ``configs/models.py``; this module only
defines the shapes of a configuration, so ``mu0_core`` never depends on the preset registry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from mu0_core.types import HISTORY_STEPS, HORIZON, NUM_CONTROL_POINTS


@dataclass(frozen=True)
class TinyBackboneConfig:
    """Packaged frozen encoders (EfficientNet-Lite0, all-MiniLM-L6-v2) + a small trainable fusion."""

    kind: Literal["tiny"] = "tiny"
    image_size: int = 160  # square input of the image encoder; 160 px keeps CPU latency low
    width: int = 128  # fusion width = prefix token width
    fusion_layers: int = 2
    heads: int = 4
    max_text_tokens: int = 16
    text_cache_size: int = 256  # instructions whose frozen text features are kept (inference)


@dataclass(frozen=True)
class HFBackboneConfig:
    """A transformers VLM from a local directory, cut to its first ``num_layers`` text layers."""

    kind: Literal["hf"] = "hf"
    model_dir: str | None = None  # local directory with config, weights and tokenizer
    architecture: str | None = None  # named architecture for random init when no weights exist
    num_layers: int | None = None
    freeze_vision: bool = True
    image_size: int | None = None
    max_text_tokens: int = 32


@dataclass(frozen=True)
class ExpertConfig:
    """The trace expert (suffix): two tokens per query point, adaLN-Zero time conditioning."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    fourier_bands: int = 8  # Fourier features of (u, v): 2 * 2 * bands values
    dropout: float = 0.0


@dataclass(frozen=True)
class TraceConfig:
    history_steps: int = HISTORY_STEPS
    num_ctrl: int = NUM_CONTROL_POINTS
    horizon: int = HORIZON
    knots: Literal["uniform", "bezier"] = (
        "uniform"  # uniform: C2; bezier: the reference's C0 joints
    )
    fit_smoothing: float = 1e-3
    # What "done" means follows from the target: over a fixed window it marks the step from
    # which the point's track is expected to be lost (occluded, out of view, past the end of
    # the episode), not the end of its motion, so the forecast goes on past it; models trained
    # on arc-length-re-timed segments (the reference's convention) hold still after it.
    hold_after_done: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Objective knobs that are part of the model's definition (optimiser settings are not)."""

    time_beta_a: float = 1.5  # flow time from Beta(1.5, 1), emphasising noisy times (pi0)
    time_beta_b: float = 1.0
    depth_dropout: float = 0.7  # the reference drops the depth image with p = 0.7
    done_loss_weight: float = 0.1
    rigidity_weight: float = 0.05
    num_sample_steps: int = 4  # Euler steps at inference
    # The sampler starts from N(0, s^2) instead of N(0, 1). Below 1 it trades sample diversity
    # for accuracy: on the held-out seeds the tiny μ0's ADE3D@32 was 4.3 mm at 1.0, 2.8 at
    # 0.5 and 2.7 at 0 (deterministic). Training does not use it.
    sample_noise_scale: float = 0.5
    # "flow" is μ0. "regression" and "tokens" are baselines on the same backbone and expert:
    # control points regressed in one pass, and waypoints as tokens decoded autoregressively.
    objective: Literal["flow", "regression", "tokens"] = "flow"


@dataclass(frozen=True)
class Mu0Config:
    name: str = "tiny"
    backbone: TinyBackboneConfig | HFBackboneConfig = field(default_factory=TinyBackboneConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mu0Config:
        d = dict(d)
        backbone = d.get("backbone", {})
        kind = backbone.get("kind", "tiny")
        backbone_cls = {"tiny": TinyBackboneConfig, "hf": HFBackboneConfig}.get(kind)
        if backbone_cls is None:
            raise ValueError(f"config.backbone.kind: unknown backbone {kind!r} (tiny, hf)")
        return cls(
            name=d.get("name", "custom"),
            backbone=_build(backbone_cls, backbone, "backbone"),
            expert=_build(ExpertConfig, d.get("expert", {}), "expert"),
            # Configs written before hold_after_done existed came from arc-length targets.
            trace=_build(TraceConfig, {"hold_after_done": True, **d.get("trace", {})}, "trace"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
        )

    def replace(self, **changes: Any) -> Mu0Config:
        return dataclasses.replace(self, **changes)


def _build(cls: type, values: dict[str, Any], path: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config.{path}: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**values)
