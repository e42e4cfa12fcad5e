"""`mu0 pretrain`: train μ0 on trace datasets (one process, or under torchrun unchanged)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="train μ0 on trace datasets (torchrun-ready)")
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="trace datasets (from `mu0 extract`) or folders holding them, or synthetic:N for N "
        "synthetic scenes",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="run directory (checkpoints, metrics, plots)"
    )
    p.add_argument("--preset", default="tiny", help="model preset")
    p.add_argument("--model-dir", default=None, help="local VLM directory for hf presets")
    p.add_argument(
        "--knots",
        choices=["uniform", "bezier"],
        default=None,
        help="B-spline knots (default: preset's)",
    )
    p.add_argument(
        "--objective",
        choices=["flow", "regression", "tokens"],
        default=None,
        help="flow is μ0; regression and tokens train the baselines on the same backbone",
    )
    p.add_argument(
        "--val-episodes",
        default=None,
        help="comma-separated episode ids held out for validation (default: every 10th episode)",
    )
    p.add_argument(
        "--exclude", default=None, help="comma-separated task or robot names left out of training"
    )
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-points", type=int, default=32)
    p.add_argument(
        "--moving-share",
        type=float,
        default=0.0,
        help="share of the --max-points slots given first to points that move (training)",
    )
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--augment-images",
        action="store_true",
        help="colour jitter and depth noise on images (turns the frozen-feature cache off)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not cache frozen-encoder features")
    p.add_argument(
        "--feature-cache",
        default=None,
        help="frozen-feature cache directory (default OUT/feature_cache; runs may share one)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last")
    p.set_defaults(func=run)


def load_datasets(paths: list[str], val_episodes: str | None, exclude: str | None):
    """→ (train, val) datasets. synthetic:N gives N synthetic scenes (10% for validation)."""
    from mu0_core import synthetic

    if len(paths) == 1 and paths[0].startswith("synthetic:"):
        n = int(paths[0].split(":", 1)[1])
        return synthetic.SyntheticTraceDataset(n, seed=0), synthetic.SyntheticTraceDataset(
            max(1, n // 10), seed=1
        )
    from torch.utils.data import ConcatDataset

    from mu0_core.trace_dataset import TraceDataset, find_datasets

    excluded = set(filter(None, (exclude or "").split(",")))
    train_parts, val_parts = [], []
    for path in [d for p in paths for d in find_datasets(p)]:
        meta = TraceDataset(path).episodes
        ids = [
            e["id"]
            for e in meta
            if e.get("task") not in excluded and e.get("robot") not in excluded
        ]
        if val_episodes:
            val = [i for i in ids if i in set(val_episodes.split(","))]
        else:
            val = ids[::10]
        train = [i for i in ids if i not in set(val)]
        train_parts.append(TraceDataset(path, episodes=train))
        if val:
            val_parts.append(TraceDataset(path, episodes=val))
    if not any(len(part) for part in train_parts):
        raise ValueError(f"no training episode left in {paths} after --exclude {exclude}")
    train = ConcatDataset(train_parts)
    val = ConcatDataset(val_parts) if val_parts else None
    return train, val


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from configs.models import trainable_config
    from mu0_core.pretrain import PretrainConfig, pretrain

    model_cfg = trainable_config(args.preset, model_dir=args.model_dir)
    if args.knots:
        model_cfg = model_cfg.replace(trace=dataclasses.replace(model_cfg.trace, knots=args.knots))
    if args.objective:
        model_cfg = model_cfg.replace(
            train=dataclasses.replace(model_cfg.train, objective=args.objective)
        )
    cfg = PretrainConfig(
        out_dir=str(args.out),
        steps=args.steps,
        batch_size=args.batch_size,
        max_points=args.max_points,
        moving_share=args.moving_share,
        lr=args.lr,
        warmup_steps=min(args.warmup_steps, max(1, args.steps // 5)),
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
        augment_images=args.augment_images,
        cache_features=not args.no_cache,
        feature_cache_dir=args.feature_cache,
        device=args.device,
    )
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, only rank 0 reports
    try:
        train, val = load_datasets(args.data, args.val_episodes, args.exclude)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"mu0 pretrain: {exc}") from None
    if main_rank:
        print(
            f"pretraining {model_cfg.name} ({model_cfg.train.objective}, {model_cfg.trace.knots} knots) "
            f"on {len(train)} samples ({len(val) if val else 0} for validation)"
        )
    final = pretrain(model_cfg, cfg, train, val, resume=args.resume)
    if main_rank:
        print(
            f"checkpoint: {final}\nmetrics: {args.out / 'metrics.jsonl'}\nplot: {args.out / 'loss.png'}"
        )
    return 0
