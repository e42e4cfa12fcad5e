"""`mu0 extract`: TraceExtract, RGB-D episodes -> the trace dataset pretraining reads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_target_args(p) -> None:
    """Options for how futures are cut, shared by `mu0 extract` and `mu0 bench extract`."""
    p.add_argument(
        "--target",
        choices=("window", "arc"),
        default="window",
        help="futures: the next 32 steps as they happened (window), or that window's path "
        "re-timed by arc length (arc, the reference's convention)",
    )
    p.add_argument("--frame-stride", type=int, default=1, help="frames between two future steps")
    p.add_argument(
        "--smooth-frames",
        type=int,
        default=5,
        help="smooth tracks over this many frames before cutting futures (1: off)",
    )


def add_tracking_args(p) -> None:
    """Keypoint options shared by `mu0 extract` and `mu0 bench extract`."""
    p.add_argument("--points", type=int, default=96, help="live keypoints per frame")
    p.add_argument(
        "--reseed-every",
        type=int,
        default=4,
        help="replace lost points with new tracks every this many frames (0: never)",
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="extract 3D point traces from RGB-D episodes (local processes or --ray)",
        description=(
            "Keypoints from motion saliency and feature clustering, Lucas-Kanade tracking "
            "with forward-backward checks, lifting with depth and camera poses, futures over "
            "a fixed time window, motion segments and captions. SOURCE is a LeRobot v3 dataset with "
            "depth or a folder of RGB and depth frames with intrinsics.json."
        ),
    )
    p.add_argument("source", type=Path, help="LeRobot v3 dataset or frame folder")
    p.add_argument("--out", type=Path, required=True, help="trace dataset directory")
    p.add_argument("--episodes", default=None, help="comma-separated episode ids (default: all)")
    add_tracking_args(p)
    add_target_args(p)
    p.add_argument("--stride", type=int, default=1, help="a sample every this many frames")
    p.add_argument("--tracker", default="lk", help="'lk' or 'package.module:factory'")
    p.add_argument("--captioner", default="rule", help="'rule' or 'package.module:factory'")
    p.add_argument(
        "--camera", default=None, help="LeRobot camera name (default: the first with depth)"
    )
    p.add_argument(
        "--intrinsics", default=None, help="fx,fy,cx,cy for datasets that do not record them"
    )
    p.add_argument("--workers", type=int, default=None, help="local processes (default: cores - 1)")
    p.add_argument(
        "--ray", action="store_true", help="run as a Ray job (RAY_ADDRESS to join a cluster)"
    )
    p.add_argument("--no-resume", action="store_true", help="redo episodes already extracted")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mu0_core.extract.pipeline import ExtractConfig, run_extract
    from mu0_core.extract.sources import open_source

    kwargs = {}
    if args.camera:
        kwargs["camera"] = args.camera
    if args.intrinsics:
        kwargs["intrinsics"] = tuple(float(x) for x in args.intrinsics.split(","))
    source = open_source(args.source, **kwargs)
    config = ExtractConfig(
        num_points=args.points,
        reseed_every=args.reseed_every,
        sample_stride=args.stride,
        target=args.target,
        frame_stride=args.frame_stride,
        smooth_frames=args.smooth_frames,
        tracker=args.tracker,
        captioner=args.captioner,
    )
    report = run_extract(
        source,
        args.out,
        config,
        workers=args.workers,
        use_ray=args.ray,
        episode_ids=args.episodes.split(",") if args.episodes else None,
        resume=not args.no_resume,
        progress=not args.quiet,
    )
    shown = {k: v for k, v in report.items() if k not in ("config", "failed")}
    print(json.dumps(shown, indent=2))
    for f in report["failed"]:
        print(f"FAILED {f['error']}")
    print(f"{report['episodes']} episodes in {args.out}, {len(report['failed'])} failed")
    return 1 if report["failed"] else 0
