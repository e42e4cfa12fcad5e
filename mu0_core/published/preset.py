"""Builds the ``paper`` preset (``config.PublishedPreset``): the published architecture with
random weights, on the meta device (counts) or materialised (latency), and inputs for it."""

from __future__ import annotations

from typing import Any

import torch

from mu0_core.published.config import PublishedPreset
from mu0_core.published.model import PublishedMu0


def build_meta(preset: PublishedPreset) -> PublishedMu0:
    """The architecture on the meta device: shapes and parameter counts, no memory."""
    vlm_cfg, dino_cfg = preset.configs()
    with torch.device("meta"):
        return PublishedMu0(preset.model, vlm_cfg, dino_cfg)


@torch.no_grad()
def build_random(preset: PublishedPreset, device: str = "cpu", seed: int = 0) -> PublishedMu0:
    """Materialise the architecture with random weights (N(0, 0.02), norms at 1), frozen and in
    eval mode. At the paper's sizes this is ~2.4e9 parameters: ~9.5 GB in fp32 on CPU."""
    from mu0_core.published.release import reset_buffers

    model = build_meta(preset).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        is_norm = "norm" in name.rsplit(".", 2)[-2]  # RMSNorm / LayerNorm scales and shifts
        if is_norm and name.endswith("weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=g)
    reset_buffers(model)
    return model.to(device).eval().requires_grad_(False)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "trainable": 0, "frozen": total}


def dummy_inputs(model: PublishedMu0, num_queries: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the right shapes for ``PublishedMu0.sample`` (benchmarks, warm-up)."""
    cfg = model.cfg
    dev = model.basis.device
    g = torch.Generator().manual_seed(seed)
    S, L = cfg.image_size, cfg.tokenizer_max_length
    vocab = model.embed_tokens.num_embeddings
    lang_mask = torch.zeros(1, L, dtype=torch.bool)
    lang_mask[:, : min(L, 12)] = True
    uv = torch.rand(1, num_queries, 2, generator=g) * 1.8 - 0.9
    z = 0.5 + torch.rand(1, num_queries, 1, generator=g)
    out = {
        "rgb": torch.rand(1, 3, S, S, generator=g),
        "depth_rgb": torch.rand(1, 3, S, S, generator=g) if cfg.use_depth else None,
        "depth_mask": torch.ones(1, dtype=torch.bool),
        "lang_tokens": torch.randint(0, vocab, (1, L), generator=g),
        "lang_mask": lang_mask,
        "current_kp": torch.cat([uv, z], dim=-1),
        "traj_history": torch.zeros(1, num_queries, cfg.history_len, 3),
        "point_mask": torch.ones(1, num_queries, dtype=torch.bool),
        "noise": torch.randn(1, num_queries, cfg.trace_bspline_n_ctrl, 3, generator=g),
    }
    return {k: (v.to(dev) if v is not None else None) for k, v in out.items()}


def describe(model: PublishedMu0) -> dict[str, Any]:
    """Token counts that set the cost: image tokens per image and the prefix length."""
    cfg = model.cfg
    vision = model.vision.config
    patches = (cfg.image_size // vision.patch_size) ** 2
    tokens = patches // model.connector.scale_factor**2
    images = 2 if cfg.use_depth else 1
    return {
        "image_size": cfg.image_size,
        "vision_patches_per_image": patches,
        "image_tokens_per_image": tokens,
        "prefix_tokens": images * tokens + cfg.tokenizer_max_length,
        "dino_tokens": (cfg.dino_input_size // model.dino_patch) ** 2 if model.dino else 0,
        "vlm_layers": model.num_vlm_layers,
        "expert_layers": model.num_expert_layers,
        "expert_width": model.expert_dim,
        "param_bytes_fp32_gb": round(
            sum(p.numel() * (2 if p.dtype == torch.bfloat16 else 4) for p in model.parameters())
            / 2**30,
            2,
        ),
    }
