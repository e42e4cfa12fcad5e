"""`mu0 collect`: record scripted-demonstrator episodes as a LeRobot v3 dataset."""

from __future__ import annotations

import argparse
import contextlib
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
    rec = p.add_argument_group(
        "recovery demonstrations",
        "the action expert drives in closed loop (with μ0's traces), then the demonstrator "
        "takes over and finishes the task (policies.recovery)",
    )
    rec.add_argument("--expert", type=Path, default=None, help="action-expert directory")
    rec.add_argument(
        "--handover",
        type=int,
        nargs=2,
        default=(60, 220),
        metavar=("FIRST", "LAST"),
        help="the takeover step is drawn per seed from FIRST..LAST",
    )
    rec.add_argument("--server", default=None, help="tcp://HOST:PORT of a running trace server")
    rec.add_argument(
        "--checkpoint", type=Path, default=Path("checkpoints/tiny"), help="μ0 for the server"
    )
    rec.add_argument(
        "--extra-steps",
        type=int,
        default=150,
        help="steps beyond the task's limit the demonstrator may take to recover",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from envs import MAX_EPISODE_STEPS
    from envs.collect import CollectConfig, collect

    if args.expert is not None and args.max_steps is None:
        args.max_steps = MAX_EPISODE_STEPS[args.task] + args.extra_steps
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
        with contextlib.ExitStack() as stack:
            rollout = None
            if args.expert is not None:
                rollout = _recovery(args, stack)
            summary = collect(args.out, cfg, progress=not args.quiet, rollout=rollout)
    except KeyboardInterrupt:
        print(f"interrupted: finished episodes are kept in {args.out}; run again to resume")
        return 130
    print(
        f"{summary['episodes']} episodes ({summary['new']} new, {summary['frames']} frames, "
        f"success {summary['success_rate']:.0%}) in {summary['path']}"
    )
    failed, declined = summary["skipped"]["failed"], summary["skipped"]["declined"]
    if failed or declined:  # only a recovery rollout declines a seed
        print(f"seeds not kept: {failed} failed, {declined} the demonstrator never took over")
    return 0


def _recovery(args: argparse.Namespace, stack: contextlib.ExitStack):
    """The recovery rollout: the expert, a trace client (to a server this starts if need be)."""
    from policies import load_expert
    from policies.recovery import recovery_rollout
    from runtime.client import TraceClient
    from runtime.commands.eval_policy import trace_server

    expert = load_expert(args.expert)
    if expert.cfg.embodiment != args.robot:
        raise SystemExit(
            f"mu0 collect: {args.expert} is a {expert.cfg.embodiment} expert, not {args.robot}"
        )
    server = args.server or stack.enter_context(trace_server(args.checkpoint))
    client = stack.enter_context(
        contextlib.closing(TraceClient(server, timeout_s=10.0, max_age_s=1.0))
    )
    client.hello()
    client.start_stream()
    try:
        return recovery_rollout(
            args.task,
            expert,
            client,
            tuple(args.handover),
            args.max_steps,
            expert_name=str(args.expert),
        )
    except ValueError as e:
        raise SystemExit(f"mu0 collect: {e}") from e
