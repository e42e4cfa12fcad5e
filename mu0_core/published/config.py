"""Configuration of the published μ0 port: plain frozen dataclasses (no torch), so presets can
name them without importing the model.

``PublishedConfig`` holds the release ``config.json`` fields the model needs; ``PublishedPreset``
is the ``paper`` preset: that architecture at the release's sizes, built offline with random
weights (for parameter counts and latency; its traces mean nothing). The sizes:

- VLM: SmolVLM2-2.2B-Instruct (``mu0_core.backbones.hf.smolvlm2_config``: SigLIP-so400m/14 at
  384 px native, pixel shuffle 3, SmolLM2-1.7B decoder 2048 wide) with its text decoder cut to
  the first 20 layers; images fed at 512 px as the release does;
- expert: 20 Llama layers at half width (1024), odd ones cross-attending;
- DINOv2-base (768 wide, 12 layers, patch 14) at 518 px, in bf16;
- everything else as the release recipe (``PublishedConfig()`` defaults).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class PublishedConfig:
    """The release's ``config.json`` fields the model needs (names as the reference spells them).

    Defaults are the release recipe (the reference's docs/release/TRAINING.md, section 4), so
    ``PublishedConfig()`` is the published architecture; a loaded release sets every field
    from its own config.json.
    """

    history_len: int = 8
    future_len: int = 32
    trace_group_horizon: int = 8
    trace_bspline_n_ctrl: int = 10
    trace_bspline_ctrl_per_token: int = 10
    trace_uv_num_freqs: int = 8
    trace_adaln_freq_embed_size: int = 256
    min_period: float = 4e-3
    max_period: float = 4.0
    num_steps: int = 4
    num_vlm_layers: int = 20
    num_expert_layers: int = 20
    self_attn_every_n_layers: int = 2
    expert_width_multiplier: float = 0.5
    attention_mode: str = "cross_attn"
    use_depth: bool = True
    depth_lora_rank: int = 8
    depth_lora_alpha: int = 16
    depth_lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    depth_clone_stem: bool = True
    use_dino: bool = True
    dino_input_size: int = 518
    dino_num_prefix_tokens: int = 1
    trace_done_head: bool = True
    done_threshold: float = 0.5
    add_image_special_tokens: bool = False
    prefix_length: int = -1
    tokenizer_max_length: int = 48
    image_size: int = 512  # resize_imgs_with_padding (square)
    delta_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)


def dinov2_base_config() -> dict[str, Any]:
    """facebook/dinov2-base's architecture (its config.json facts)."""
    return {
        "model_type": "dinov2",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "mlp_ratio": 4,
        "patch_size": 14,
        "image_size": 518,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
        "qkv_bias": True,
        "use_swiglu_ffn": False,
    }


@dataclass(frozen=True)
class PublishedPreset:
    name: str = "paper"
    kind: Literal["published"] = "published"
    model: PublishedConfig = field(default_factory=PublishedConfig)
    vlm_architecture: str = "smolvlm2-2.2b"
    dino: dict[str, Any] = field(default_factory=dinov2_base_config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def configs(self) -> tuple[Any, Any]:
        """(SmolVLM config, DINOv2 config) as transformers objects."""
        from transformers import AutoConfig

        from mu0_core.backbones.hf import smolvlm2_config

        vlm = smolvlm2_config(self.vlm_architecture)
        vlm_cfg = AutoConfig.for_model(vlm.pop("model_type"), **vlm)
        dino = dict(self.dino)
        return vlm_cfg, AutoConfig.for_model(dino.pop("model_type"), **dino)
