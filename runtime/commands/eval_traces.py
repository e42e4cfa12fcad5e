"""`mu0 eval-traces`: μ0 against baselines on held-out episodes, as a table and pictures.

Splits (each a list of episode ids in a trace dataset): held-out seeds of the trained tasks and
robots, a task left out of pretraining, and a robot left out of pretraining (action-free
transfer). With no arguments it evaluates the shipped checkpoints on a held-out set it builds
here (collected in simulation and extracted from pixels; built once, then reused).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_CHECKPOINTS = {
    "mu0": "checkpoints/tiny",
    "mu0_bezier": "checkpoints/tiny-bezier",
    "regression": "checkpoints/tiny-regression",
    "tokens": "checkpoints/tiny-tokens",
}


def add_parser(sub) -> None:
    p = sub.add_parser("eval-traces", help="evaluate μ0 and baselines on held-out traces")
    p.add_argument(
        "--data", type=Path, default=None, help="trace dataset (default: build the held-out set)"
    )
    p.add_argument(
        "--splits",
        type=Path,
        default=None,
        help="JSON {split: [episode ids]} (default: DATA/splits.json, else all episodes)",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        default=None,
        metavar="NAME=DIR",
        help="a model to evaluate (repeatable); default: the shipped checkpoints",
    )
    p.add_argument(
        "--out", type=Path, default=Path("outputs/eval_traces"), help="tables and pictures"
    )
    p.add_argument(
        "--json", type=Path, default=None, help="write {model: {metric: value}} at H=32 here"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-points", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=None, help="per split (quick looks)")
    p.add_argument("--samples-k", type=int, default=5, help="samples for minADE_K (flow models)")
    p.add_argument("--examples", type=int, default=4, help="pictures per split")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _parse_checkpoints(specs: list[str] | None) -> dict[str, str]:
    if not specs:
        missing = [
            d for d in DEFAULT_CHECKPOINTS.values() if not (Path(d) / "config.json").is_file()
        ]
        if missing:
            raise SystemExit(
                f"mu0 eval-traces: shipped checkpoints missing: {missing} (see README, `make checkpoints`)"
            )
        return dict(DEFAULT_CHECKPOINTS)
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"mu0 eval-traces: --checkpoint takes NAME=DIR, got {spec!r}")
        out[name] = path
    return out


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from mu0_core.checkpoint import load_checkpoint
    from mu0_core.evaluate import Predictor, draw_examples, evaluate, markdown_table
    from mu0_core.feature_cache import FeatureCache
    from mu0_core.trace_dataset import TraceDataset, collate_traces

    data = args.data
    if data is None:
        from runtime.heldout import build_heldout_set

        data = build_heldout_set()
    splits_path = args.splits or (data / "splits.json")
    all_ids = [e["id"] for e in TraceDataset(data).episodes]
    splits = json.loads(splits_path.read_text()) if splits_path.is_file() else {"all": all_ids}

    models = {
        name: load_checkpoint(path)[0] for name, path in _parse_checkpoints(args.checkpoint).items()
    }
    predictors = [
        Predictor("static", kind="static"),
        Predictor("constant_velocity", kind="constant_velocity"),
    ]
    predictors += [Predictor(name, model) for name, model in models.items()]
    # Models built on the same frozen encoders share one feature cache.
    first = next(iter(models.values()))
    cache = FeatureCache(args.out / "feature_cache", first.backbone)

    results, tables = {}, []
    for split, ids in splits.items():
        ids = [i for i in ids if i in set(all_ids)]
        if not ids:
            continue
        ds = TraceDataset(data, episodes=ids)
        n = len(ds)
        index_batches = [
            list(range(i, min(n, i + args.batch_size))) for i in range(0, n, args.batch_size)
        ]
        if args.max_batches:
            index_batches = index_batches[: args.max_batches]

        def batches(index_batches=index_batches, ds=ds):
            for k, idx in enumerate(index_batches):
                items = [ds[i] for i in idx]
                batch = collate_traces(
                    items, max_points=args.max_points, rng=np.random.default_rng(args.seed + k)
                )
                feats = [
                    cache.encode(
                        it["rgb"],
                        it["depth_m"] if (it["depth_m"] > 0).any() else None,
                        it["instruction"],
                    )
                    for it in items
                ]
                batch.frozen = FeatureCache.collate(feats)
                yield batch

        with torch.no_grad():
            res = evaluate(predictors, batches, num_samples_k=args.samples_k, seed=args.seed)
        results[split] = res
        tables.append(markdown_table(res, title=f"{split} ({len(ids)} episodes, {n} samples)"))
        print(tables[-1] + "\n")
        # Pictures: the first samples of the split, every model side by side.
        pick = list(range(0, n, max(1, n // max(1, args.examples))))[: args.examples]
        items = [ds[i] for i in pick]
        batch = collate_traces(
            items, max_points=args.max_points, rng=np.random.default_rng(args.seed)
        )
        batch.frozen = FeatureCache.collate(
            [
                cache.encode(
                    it["rgb"],
                    it["depth_m"] if (it["depth_m"] > 0).any() else None,
                    it["instruction"],
                )
                for it in items
            ]
        )
        draw_examples(predictors, items, batch, args.out / split, seed=args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "table.md").write_text("\n\n".join(tables) + "\n")
    print(f"table: {args.out / 'table.md'}\npictures: {args.out}/<split>/example_*.png")
    if args.json:
        main = next(iter(results.values()))  # the first split is the headline (held-out seeds)
        h32 = {
            name: {
                k.replace("_h32", ""): v
                for k, v in m.items()
                if k.endswith("_h32") or "_h" not in k
            }
            for name, m in main.items()
        }
        h32["_splits"] = results  # every split, every horizon
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(h32, indent=2))
        print(f"wrote {args.json}")
    return 0
