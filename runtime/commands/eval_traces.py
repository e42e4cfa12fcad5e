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
        "--data",
        type=Path,
        default=None,
        help="a trace dataset, or a folder of <split>/<dataset>/ (default: build the held-out set)",
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
    p.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="per task-robot pair, spread evenly over its samples (quick looks)",
    )
    p.add_argument("--samples-k", type=int, default=5, help="samples for minADE_K (flow models)")
    p.add_argument("--examples", type=int, default=4, help="pictures per split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--noise-scale",
        type=float,
        default=None,
        help="flow sampler temperature for every μ0 model (default: each checkpoint's own)",
    )
    p.set_defaults(func=run)


def _parse_checkpoints(specs: list[str] | None) -> dict[str, str]:
    if not specs:
        missing = [
            d for d in DEFAULT_CHECKPOINTS.values() if not (Path(d) / "config.json").is_file()
        ]
        if missing:
            raise SystemExit(
                f"mu0 eval-traces: shipped checkpoints missing: {missing} (build them with scripts/make_checkpoints.sh)"
            )
        return dict(DEFAULT_CHECKPOINTS)
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"mu0 eval-traces: --checkpoint takes NAME=DIR, got {spec!r}")
        out[name] = path
    return out


def discover_splits(data: Path) -> dict[str, list[Path]]:
    """A trace dataset → {"all": [it]}; a folder of ``<split>/<dataset>/`` → one entry per
    split, the held-out seeds first (a split named ``train`` is what the models learned from).
    A dataset directly in the folder is a split of its own."""
    from mu0_core.trace_dataset import META_FILE, find_datasets

    data = Path(data)
    if (data / META_FILE).is_file():
        return {"all": [data]}
    splits = {}
    for split in sorted(p for p in data.iterdir() if p.is_dir() and p.name != "train"):
        try:
            splits[split.name] = find_datasets(split)
        except FileNotFoundError:  # a folder without trace datasets (pictures, caches)
            continue
    return dict(sorted(splits.items(), key=lambda kv: kv[0] != "heldout_seeds"))


def _spread_batches(n: int, batch_size: int, max_batches: int | None) -> list[list[int]]:
    """Batches of sample indices; with ``max_batches``, that many batches' worth of samples
    spread evenly over all ``n`` (consecutive samples are near-copies of one another)."""
    import numpy as np

    if max_batches and max_batches * batch_size < n:
        idx = np.linspace(0, n - 1, max_batches * batch_size).round().astype(int).tolist()
    else:
        idx = list(range(n))
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from torch.utils.data import ConcatDataset

    from mu0_core.checkpoint import load_checkpoint
    from mu0_core.evaluate import Predictor, Tally, draw_examples, evaluate_tally, markdown_table
    from mu0_core.feature_cache import FeatureCache
    from mu0_core.trace_dataset import TraceDataset, collate_traces

    data = args.data
    if data is None:
        from runtime.heldout import build_heldout_set

        data = build_heldout_set()
    splits = discover_splits(data)
    if not splits:
        raise SystemExit(f"mu0 eval-traces: no trace dataset under {data}")

    models = {
        name: load_checkpoint(path)[0] for name, path in _parse_checkpoints(args.checkpoint).items()
    }
    predictors = [
        Predictor("static", kind="static"),
        Predictor("constant_velocity", kind="constant_velocity"),
    ]
    predictors += [
        Predictor(name, model, noise_scale=args.noise_scale) for name, model in models.items()
    ]
    # Models built on the same frozen encoders share one feature cache.
    cache = FeatureCache(args.out / "feature_cache", next(iter(models.values())).backbone)

    def make_batch(items, seed):
        batch = collate_traces(items, max_points=args.max_points, rng=np.random.default_rng(seed))
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
        return batch

    # The extracted labels as a forecast, scored against the truth: the ceiling of learning
    # from them (only where the data has the simulator's truth).
    predictors.append(Predictor("labels", kind="labels"))
    results, pair_results, tables = {}, {}, []
    for split, dirs in splits.items():
        split_tally, counts = Tally(), []
        pair_results[split] = {}
        for d in dirs:
            ds = TraceDataset(d)
            n = len(ds)
            if n == 0:
                continue
            index_batches = _spread_batches(n, args.batch_size, args.max_batches)
            counts.append(sum(len(b) for b in index_batches))

            def batches(index_batches=index_batches, ds=ds):
                for k, idx in enumerate(index_batches):
                    yield make_batch([ds[i] for i in idx], args.seed + k)

            with torch.no_grad():
                tally = evaluate_tally(
                    predictors, batches, num_samples_k=args.samples_k, seed=args.seed
                )
            pair_results[split][d.name] = tally.means()
            split_tally.merge(tally)
        if not counts:
            continue
        res = split_tally.means()
        results[split] = res
        names = ", ".join(d.name for d in dirs)
        tables.append(markdown_table(res, title=f"{split}: {names} ({sum(counts)} samples)"))
        print(tables[-1] + "\n")
        if len(pair_results[split]) > 1:
            for name, pres in pair_results[split].items():
                tables.append(markdown_table(pres, title=f"{split} / {name}"))
        # Pictures: samples spread over the split, every model side by side.
        ds = ConcatDataset([TraceDataset(d) for d in dirs])
        n = len(ds)
        pick = list(range(0, n, max(1, n // max(1, args.examples))))[: args.examples]
        if not pick:  # --examples 0
            continue
        items = [ds[i] for i in pick]
        with torch.no_grad():
            draw_examples(
                [p for p in predictors if p.kind != "labels"],
                items,
                make_batch(items, args.seed),
                args.out / split,
                seed=args.seed,
            )

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "table.md").write_text("\n\n".join(tables) + "\n")
    print(f"table: {args.out / 'table.md'}\npictures: {args.out}/<split>/example_*.png")
    if args.json:
        headline = next(iter(results.values()))  # held-out seeds when present
        h32 = {
            name: {
                k.replace("_h32", ""): v
                for k, v in m.items()
                if k.endswith("_h32") or "_h" not in k
            }
            for name, m in headline.items()
        }
        h32["_splits"] = results  # every split, every horizon
        h32["_pairs"] = pair_results  # every task-robot pair of every split
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(h32, indent=2))
        print(f"wrote {args.json}")
    return 0
