"""`mu0 demo`, the main job: the shipped tiny μ0 served on CPU, the Panda expert acting on a
robosuite task through the trace client; prints success and latencies and saves videos with
the predicted traces drawn (``outputs/demo/``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the shipped μ0 + Panda expert in simulation (the main job)")
    p.add_argument("--task", default="Lift")
    p.add_argument("--robot", default="Panda")
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--seed", type=int, default=5000)
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/tiny"))
    p.add_argument("--experts", type=Path, default=Path("checkpoints/experts"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from runtime.commands import eval_policy

    t0 = time.time()
    ns = argparse.Namespace(
        tasks=args.task,
        robots=args.robot,
        conditions="mu0",
        episodes=args.episodes,
        seed=args.seed,
        experts=args.experts,
        checkpoint=args.checkpoint,
        server=None,
        device=args.device,
        rate_hz=20.0,
        max_steps=None,
        trace_max_age=1.0,
        realtime=False,
        videos=args.episodes,
        out=args.out,
        json=args.out / "demo.json",
        sequential=True,
    )
    eval_policy.run(ns)
    print(f"demo wall time {time.time() - t0:.0f} s")
    return 0
