"""`mu0 collect`: record scripted-demonstrator episodes as a LeRobot v3 dataset."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "collect",
        help="record simulated RGB-D episodes (LeRobot v3 layout; resumable)",
        description=(
            "Roll the task's scripted demonstrator and record RGB, lossless depth (float32 "
            "metres), camera parameters, proprioception, actions, the instruction and the "
            "simulator's body poses. Each finished episode is written atomically; running "
            "again into the same directory resumes with the next seed."
        ),
    )
    p.add_argument("--out", type=Path, required=True, help="dataset directory")
    p.add_argument("--task", default="Lift", help="Lift, Stack, PickPlaceCan or Door")
    p.add_argument("--robot", default="Panda", help="Panda, UR5e, Kinova3 or IIWA")
    p.add_argument("--episodes", type=int, default=10, help="episodes the dataset should hold")
    p.add_argument("--seed", type=int, default=0, help="seed of the first episode")
    p.add_argument("--image-size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    p.add_argument("--camera", default=None, help="camera name (default: the task's default)")
    p.add_argument("--max-steps", type=int, default=None, help="steps per episode at most")
    p.add_argument("--only-success", action="store_true", help="drop failed demonstrations")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from envs.collect import CollectConfig, collect

    cfg = CollectConfig(
        task=args.task,
        robot=args.robot,
        episodes=args.episodes,
        seed=args.seed,
        image_size=tuple(args.image_size),
        camera=args.camera,
        max_steps=args.max_steps,
        only_success=args.only_success,
    )
    try:
        summary = collect(args.out, cfg, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"interrupted: finished episodes are kept in {args.out}; run again to resume")
        return 130
    print(
        f"{summary['episodes']} episodes ({summary['new']} new, {summary['frames']} frames, "
        f"success {summary['success_rate']:.0%}) in {summary['path']}"
    )
    return 0
