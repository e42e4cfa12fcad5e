"""`mu0 bench extract`: TraceExtract against the simulator's truth on freshly collected episodes.

Collects a few held-out episodes (seeds far from the training ones), extracts traces from
pixels alone, and compares them with the truth: each tracked point's 3D position in its
query frame (frame 0, or the frame a re-seeded track starts at) is attached to the
simulator body it lies on (the body seen at its pixel there) and moved rigidly with that
body's recorded pose. Errors count the valid tracked steps after each track's query frame:
2D in pixels (the truth projected with the recorded camera) and 3D in millimetres;
throughput is frames extracted per second (collection not included). Coverage,
``share_valid``, is the number of valid points per frame as a share of the points asked
for (``--points``); ``share_valid_steps`` is the share of valid steps over all tracks.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from runtime.commands.extract import add_tracking_args

HELD_OUT_SEED = 100_000  # far from the seeds `mu0 collect` starts at
GT_MOVING_M = 0.02  # a point counts as moving when its true path is longer than this


def add_bench_parser(what) -> None:
    p = what.add_parser(
        "extract", help="TraceExtract vs simulator truth: 2D/3D track error, throughput"
    )
    p.add_argument("--task", default="Lift")
    p.add_argument("--robot", default="Panda")
    p.add_argument("--episodes", type=int, default=2)
    p.add_argument("--image-size", type=int, default=128, help="square camera images, pixels")
    add_tracking_args(p)
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    p.add_argument(
        "--workdir", type=Path, default=None, help="keep the episodes here (default: a temp dir)"
    )
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.set_defaults(func=run)


def track_errors(traces: Any) -> dict[str, Any]:
    """2D (px) and 3D (mm) errors of one episode's tracks against its simulator truth.

    traces: ``mu0_core.extract.pipeline.EpisodeTraces`` with ``gt_xyz_world``. Returns
    flat arrays of per-step errors over valid steps t > 0, and whether each step's point
    moves (so moving points can be reported on their own).
    """
    import numpy as np

    from mu0_core.geometry import invert_transform, project, transform_points

    ep, gt = traces.episode, traces.gt_xyz_world
    if gt is None:
        raise ValueError(f"episode {ep.id} has no simulator truth (body poses)")
    T_cam_world = invert_transform(ep.T_world_cam.astype(np.float64))  # [F, 4, 4]
    K = ep.intrinsics.astype(np.float64)
    gt_cam = transform_points(T_cam_world, gt)  # [F, N, 3]
    gt_uv, _ = project(gt_cam, K[:, 0], K[:, 1], K[:, 2], K[:, 3])
    valid = traces.valid.copy()
    # A track's query frame is the truth's anchor: its error there is zero by construction.
    valid[traces.query_frame, np.arange(valid.shape[1])] = False
    err_px = np.linalg.norm(traces.uv_px - gt_uv, axis=-1)[valid]
    err_mm = 1000.0 * np.linalg.norm(traces.xyz_world - gt, axis=-1)[valid]
    # "Moving" by the truth, not by the extractor's own flag: a point whose body carries it
    # more than 2 cm over the episode.
    gt_path = np.linalg.norm(np.diff(gt, axis=0), axis=-1).sum(0)  # [N]
    moving = np.broadcast_to((gt_path > GT_MOVING_M)[None], valid.shape)[valid]
    report = traces.report()
    return {
        "px": err_px,
        "mm": err_mm,
        "moving": moving,
        "share_valid": report["share_valid"],
        "share_valid_steps": report["share_valid_steps"],
        "tracks": report["points"],
    }


def evaluate(
    episodes_dir: Path, points: int, progress: bool = True, reseed_every: int = 4
) -> dict[str, Any]:
    import numpy as np
    from tqdm.auto import tqdm

    from mu0_core.extract.pipeline import ExtractConfig, extract_episode
    from mu0_core.extract.sources import open_source

    source = open_source(episodes_dir)
    config = ExtractConfig(num_points=points, reseed_every=reseed_every)
    px, mm, moving, share_valid, share_steps, tracks, frames, seconds = (
        [],
        [],
        [],
        [],
        [],
        0,
        0,
        0.0,
    )
    for eid in tqdm(source.episode_ids(), desc="bench extract", unit="ep", disable=not progress):
        ep = source.load(eid)
        start = time.perf_counter()
        traces = extract_episode(ep, config)
        seconds += time.perf_counter() - start
        frames += ep.num_frames
        e = track_errors(traces)
        px.append(e["px"])
        mm.append(e["mm"])
        moving.append(e["moving"])
        share_valid.append(e["share_valid"])
        share_steps.append(e["share_valid_steps"])
        tracks += e["tracks"]
    px, mm, moving = np.concatenate(px), np.concatenate(mm), np.concatenate(moving)

    def median(x):
        return float(np.median(x)) if len(x) else None

    # The headline figures are over moving points: static ones track trivially (their
    # error is ~0) and would hide the tracker's real error in the median.
    return {
        "track_err_px_median": median(px[moving]),
        "track_err_mm_median": median(mm[moving]),
        "frames_per_s": frames / seconds if seconds else None,
        "track_err_px_median_all": median(px),
        "track_err_mm_median_all": median(mm),
        "track_err_px_p90": float(np.percentile(px[moving], 90)) if moving.any() else None,
        "track_err_mm_p90": float(np.percentile(mm[moving], 90)) if moving.any() else None,
        "share_valid": float(np.mean(share_valid)),
        "share_valid_steps": float(np.mean(share_steps)),
        "tracks": tracks,
        "evaluated_steps": int(len(px)),
        "evaluated_steps_moving": int(moving.sum()),
        "frames": frames,
        "episodes": len(source.episode_ids()),
    }


def run(args: argparse.Namespace) -> int:
    from envs.collect import CollectConfig, collect
    from runtime.commands.bench import write_json

    with tempfile.TemporaryDirectory(prefix="mu0-bench-extract-") as tmp:
        workdir = args.workdir or Path(tmp)
        cfg = CollectConfig(
            task=args.task,
            robot=args.robot,
            episodes=args.episodes,
            seed=args.seed,
            image_size=(args.image_size, args.image_size),
        )
        summary = collect(workdir, cfg)
        result = evaluate(workdir, args.points, reseed_every=args.reseed_every)
    result.update(
        task=args.task,
        robot=args.robot,
        image_size=args.image_size,
        points_per_episode=args.points,
        reseed_every=args.reseed_every,
        collect_success_rate=summary["success_rate"],
        goal={"track_err_px_median": 2.0, "track_err_mm_median": 10.0},
    )
    print(
        f"extract vs truth ({result['episodes']} {args.task}/{args.robot} episodes, {args.image_size} px): "
        f"moving points: median 2D {result['track_err_px_median']:.2f} px, "
        f"3D {result['track_err_mm_median']:.1f} mm (all points: {result['track_err_px_median_all']:.2f} px, "
        f"{result['track_err_mm_median_all']:.1f} mm; valid {result['share_valid']:.0%}), "
        f"{result['frames_per_s']:.1f} frames/s"
    )
    write_json(args.json, result)
    return 0
