"""`mu0 info`: what a preset or checkpoint is (sizes, config, frozen parts)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from runtime.serve import add_release_args, load_published


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="summarise a model preset or checkpoint")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="model preset (default: tiny)")
    src.add_argument("--checkpoint", default=None, help="a μ0 checkpoint directory")
    p.add_argument("--list", action="store_true", help="list the model presets and exit")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_release_args(p)
    p.set_defaults(func=run)


def load_model_from_args(args: argparse.Namespace, device: str = "cpu"):
    """A model from --checkpoint, else a freshly initialised --preset (random trainable weights)."""
    from configs.models import trainable_config
    from mu0_core.checkpoint import load_checkpoint
    from mu0_core.model import Mu0

    if args.checkpoint:
        model, meta = load_checkpoint(args.checkpoint, device)
        return model, f"checkpoint {args.checkpoint}", meta
    cfg = trainable_config(args.preset or "tiny")
    return (
        Mu0(cfg).to(device).eval(),
        f"preset {cfg.name} (untrained: random trainable weights)",
        {},
    )


def run(args: argparse.Namespace) -> int:
    from configs import get_model_config, list_model_presets
    from configs.models import is_published

    if args.list:
        print("\n".join(list_model_presets()))
        return 0
    from mu0_core.published.release import is_release_dir

    if args.checkpoint and is_release_dir(args.checkpoint):
        return _run_published(args)
    if args.preset and is_published(get_model_config(args.preset)):
        return _run_published_preset(args)
    model, source, meta = load_model_from_args(args)
    counts = model.count_parameters()
    summary = {
        "source": source,
        "params": counts,
        "frozen_modules": {
            name: sum(p.numel() for p in m.parameters())
            for name, m in model.backbone.frozen_modules().items()
        },
        "horizon": model.cfg.trace.horizon,
        "history_steps": model.cfg.trace.history_steps,
        "control_points": model.cfg.trace.num_ctrl,
        "knots": model.cfg.trace.knots,
        "euler_steps": model.cfg.train.num_sample_steps,
        "noise_scale": model.cfg.train.sample_noise_scale,
        "units": "uv normalised to [-1, 1] (OpenCV pixels, v down), depth z in metres; camera frame OpenCV",
        "config": model.cfg.to_dict(),
    }
    if meta:
        summary["checkpoint"] = {
            k: meta[k] for k in ("content_hash", "code_version", "created", "extra") if k in meta
        }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"μ0 — {source}")
    print(
        f"  parameters: {counts['total'] / 1e6:.2f}M total, {counts['trainable'] / 1e6:.2f}M trainable, "
        f"{counts['frozen'] / 1e6:.2f}M frozen"
    )
    for name, n in summary["frozen_modules"].items():
        print(f"  frozen: {name} ({n / 1e6:.2f}M)")
    print(
        f"  traces: {summary['history_steps']} history steps → {summary['control_points']} "
        f"{summary['knots']} B-spline control points → horizon {summary['horizon']}, "
        f"{summary['euler_steps']} Euler steps from N(0, {summary['noise_scale']:g}²)"
    )
    print(f"  units: {summary['units']}")
    return 0


def _run_published(args: argparse.Namespace) -> int:
    """`mu0 info --checkpoint RELEASE_DIR --vlm-dir ... --dino-dir ...`."""
    rel = load_published(args).release
    model = rel.model
    groups = {
        "vision (SigLIP + depth stem + LoRA)": model.vision,
        "connector": model.connector,
        "vlm text layers": model.vlm_layers,
        "token embedding": model.embed_tokens,
        "expert": model.expert_layers,
        "dinov2 (bf16)": model.dino,
    }
    total = sum(p.numel() for p in model.parameters())
    summary = {
        "source": f"published μ0 release {args.checkpoint}",
        "model_hash": rel.content_hash,
        "params": {"total": total, "trainable": 0, "frozen": total},
        "modules": {k: sum(p.numel() for p in m.parameters()) for k, m in groups.items() if m},
        "tensors_used": len(rel.used_keys),
        "tensors_ignored": rel.ignored_keys,
        "horizon": rel.cfg.future_len,
        "history_steps": rel.cfg.history_len,
        "control_points": rel.cfg.trace_bspline_n_ctrl,
        "knots": "bezier (C0, the reference's)",
        "euler_steps": rel.cfg.num_steps,
        "config": dataclasses.asdict(rel.cfg),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"μ0 — {summary['source']} (hash {rel.content_hash})")
    print(f"  parameters: {total / 1e6:.2f}M, all frozen")
    for name, n in summary["modules"].items():
        print(f"  {name}: {n / 1e6:.2f}M")
    print(
        f"  tensors: {len(rel.used_keys)} loaded, {len(rel.ignored_keys)} ignored on purpose "
        f"({', '.join(sorted(set(rel.ignored_keys.values())))})"
    )
    print(
        f"  traces: {rel.cfg.history_len} past steps → {rel.cfg.trace_bspline_n_ctrl} control "
        f"points (C0 B-spline) → horizon {rel.cfg.future_len}, {rel.cfg.num_steps} Euler steps"
    )
    return 0


def _run_published_preset(args: argparse.Namespace) -> int:
    """`mu0 info --preset paper`: the published architecture's sizes, counted on the meta device."""
    from configs import get_model_config
    from mu0_core.published.preset import build_meta, describe, parameter_counts

    preset = get_model_config(args.preset)
    model = build_meta(preset)
    counts = parameter_counts(model)
    summary = {
        "source": f"preset {preset.name}: the published μ0 architecture (random weights)",
        "params": counts,
        **describe(model),
        "config": preset.to_dict(),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"μ0 — {summary['source']}")
    print(f"  parameters: {counts['total'] / 1e6:.1f}M, all frozen")
    print(
        f"  prefix: {summary['prefix_tokens']} tokens ({summary['image_tokens_per_image']} per "
        f"{summary['image_size']} px image, RGB + depth, + {preset.model.tokenizer_max_length} text) "
        f"through {summary['vlm_layers']} VLM layers; expert {summary['expert_layers']} layers "
        f"x {summary['expert_width']}; DINOv2 {summary['dino_tokens']} tokens"
    )
    return 0
