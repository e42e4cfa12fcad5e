"""`mu0 train-expert`: train one embodiment's action expert against the frozen μ0.

The traces it learns from are μ0's predictions on the recorded observations (cached under
``OUT/trace_cache``), never the ground truth. Runs under ``torchrun`` unchanged (DDP).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("train-expert", help="train an action expert against the frozen μ0")
    p.add_argument("--robot", required=True, help="embodiment: Panda, UR5e or Kinova3")
    p.add_argument("--data", nargs="+", required=True, help="recordings from `mu0 collect`")
    p.add_argument("--checkpoint", default="checkpoints/tiny", help="the frozen μ0")
    p.add_argument("--out", type=Path, required=True, help="run directory (final/ is the expert)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--stride", type=int, default=2, help="a sample every this many frames")
    p.add_argument(
        "--max-trace-lag",
        type=int,
        default=4,
        help="train on traces from up to this many frames earlier (they arrive late at run time)",
    )
    p.add_argument(
        "--no-goal-input",
        dest="goal_input",
        action="store_false",
        help="keep the predicted segment goal out of the action head's context "
        "(how the shipped Panda expert was trained)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from policies.train import ExpertTrainConfig, train_expert

    for d in args.data:
        if not (Path(d) / "meta" / "info.json").is_file():
            raise SystemExit(f"mu0 train-expert: {d} is not a LeRobot v3 recording (mu0 collect)")
    final = train_expert(
        ExpertTrainConfig(
            robot=args.robot,
            data=tuple(args.data),
            checkpoint=args.checkpoint,
            out_dir=str(args.out),
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            stride=args.stride,
            max_trace_lag=args.max_trace_lag,
            goal_input=args.goal_input,
            seed=args.seed,
            device=args.device,
        )
    )
    print(f"expert: {final}\nloss curve: {args.out / 'loss.png'}")
    return 0
