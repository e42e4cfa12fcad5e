"""`mu0 bench <what>`: benchmarks that print figures and write them as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Repeats per preset: big random-weight VLMs are slow on a CPU; a few runs suffice for p50/p90.
DEFAULT_REPEATS = {"tiny": 30, "small": 5, "paper": 3}


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (model latency, ...) as printed figures and JSON")
    what = p.add_subparsers(dest="what", metavar="WHAT")
    m = what.add_parser("model", help="parameter counts and sample() latency per preset")
    m.add_argument("--presets", default="tiny,small,paper", help="comma-separated preset names")
    m.add_argument("--queries", default="16,64", help="query counts to time")
    m.add_argument("--repeats", type=int, default=None, help="timed runs per query count")
    m.add_argument("--steps", type=int, default=4, help="Euler steps")
    m.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (2 = the target laptop)"
    )
    m.add_argument("--device", default="cpu")
    m.add_argument("--json", type=Path, default=None, help="write the figures here")
    m.set_defaults(func=run_model)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def run_model(args: argparse.Namespace) -> int:
    import torch

    from configs import get_model_config
    from mu0_core.bench import bench_preset

    torch.set_num_threads(args.threads)
    queries = tuple(int(q) for q in args.queries.split(","))
    results = {}
    for name in [s.strip() for s in args.presets.split(",") if s.strip()]:
        cfg = get_model_config(name)
        repeats = args.repeats or DEFAULT_REPEATS.get(name, 10)
        try:
            results[name] = bench_preset(
                cfg, queries, repeats=repeats, num_steps=args.steps, device=args.device
            )
        except (MemoryError, RuntimeError) as e:  # a preset too big for this machine
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        results[name]["threads"] = args.threads
        _print_row(name, results[name], queries)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _print_row(name: str, r: dict, queries: tuple[int, ...]) -> None:
    if "error" in r:
        print(f"{name:6s}  could not run: {r['error']}")
        return
    lat = "  ".join(
        f"q{q}: p50 {r[f'sample_ms_p50_q{q}']:.1f} ms, p90 {r[f'sample_ms_p90_q{q}']:.1f} ms"
        for q in queries
    )
    note = " (random weights)" if r.get("random_weights") else ""
    print(
        f"{name:6s}  params {r['params_total'] / 1e6:.1f}M total, {r['params_trainable'] / 1e6:.2f}M trainable"
        f"  |  {lat}  |  {r['device']}, {r['threads']} threads{note}"
    )
