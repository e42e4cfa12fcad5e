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

Label quality (``labels``): the futures pretraining learns from, per target kind, against
the simulator's truth for the same queries (``gt_future_uvz``: each point's body moved
rigidly from the sample's frame), on the points that move (the truth gets more than 2 cm
from where the point is now within the horizon): ADE and FDE in mm over the label's valid
steps, mean and median over (sample, point) pairs, beside "no motion" on the same steps.
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
# Target definitions whose labels are scored: name -> ExtractConfig fields.
TARGET_KINDS: dict[str, dict[str, Any]] = {
    "window": {"target": "window"},
    "window_unsmoothed": {"target": "window", "smooth_frames": 1},
    "arc": {"target": "arc"},
}
LABEL_GOAL_MM = {"median": 3.0, "mean": 8.0}


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
        "--data",
        type=Path,
        nargs="+",
        default=None,
        help="score these collected episode folders (mu0 collect) instead of collecting new ones",
    )
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


def label_errors(traces: Any, samples: dict[str, Any] | None = None) -> dict[str, Any]:
    """The extracted futures of one episode against the simulator's truth for the same
    queries, on moving points. samples: packed samples with ``gt_future_uvz`` and
    ``gt_future_valid`` (default: the episode's own). Returns per (sample, point) arrays over
    the moving points: ADE and FDE (mm) of the label and of "no motion" over the label's valid
    steps after now, the label's and the truth's displacement (mm) at that last step, and the
    share of the truth's future steps the label covers."""
    import numpy as np

    from mu0_core.geometry import uvz_to_xyz

    ep = traces.episode
    samples = traces.samples if samples is None else samples
    if "gt_future_uvz" not in samples:
        raise ValueError(f"episode {ep.id} has no simulator truth (body poses)")
    t = samples["sample_frame"]
    H, W = ep.depth_m.shape[1:]
    K = ep.intrinsics[t].astype(np.float64)  # [S, 4]
    size = np.array([W, H], np.float64)
    lab = uvz_to_xyz(samples["future_uvz"].astype(np.float64), K, size)  # [S, N, Hz, 3]
    gt = uvz_to_xyz(samples["gt_future_uvz"].astype(np.float64), K, size)
    lab_ok, gt_ok = samples["future_valid"], samples["gt_future_valid"]
    cur = gt[:, :, :1]
    true_disp = np.linalg.norm(gt - cur, axis=-1)  # [S, N, Hz]
    moving = samples["point_mask"] & (np.where(gt_ok, true_disp, 0.0).max(-1) > GT_MOVING_M)
    both = lab_ok & gt_ok
    both[..., 0] = False  # step 0 is "now": equal by construction
    scored = moving & both.any(-1)
    err = np.linalg.norm(lab - gt, axis=-1)
    n = np.maximum(both.sum(-1), 1)
    ade = np.where(both, err, 0.0).sum(-1) / n
    ade_static = np.where(both, true_disp, 0.0).sum(-1) / n
    last = np.where(both, np.arange(both.shape[-1]), -1).max(-1).clip(0)  # [S, N]
    take = np.take_along_axis
    fde = take(err, last[..., None], -1)[..., 0]
    label_disp = take(np.linalg.norm(lab - cur, axis=-1), last[..., None], -1)[..., 0]
    truth_disp = take(true_disp, last[..., None], -1)[..., 0]
    covered = (lab_ok & gt_ok)[moving].sum() / max(gt_ok[moving].sum(), 1)
    return {
        "ade_mm": 1e3 * ade[scored],
        "fde_mm": 1e3 * fde[scored],
        "static_ade_mm": 1e3 * ade_static[scored],
        "label_disp_mm": 1e3 * label_disp[scored],
        "truth_disp_mm": 1e3 * truth_disp[scored],
        "coverage": float(covered),
        "moving_points": int(moving.sum()),
    }


def summarise_labels(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool ``label_errors`` of several episodes into the figures the bench reports."""
    import numpy as np

    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k.endswith("_mm")}
    moving = sum(p["moving_points"] for p in parts)
    scored = len(cat["ade_mm"])

    def stat(x, f):
        return float(f(x)) if len(x) else None

    out = {"moving_points": moving, "scored_points": scored}
    for key in ("ade_mm", "fde_mm", "static_ade_mm"):
        out[f"{key.removesuffix('_mm')}_mean_mm"] = stat(cat[key], np.mean)
        out[f"{key.removesuffix('_mm')}_median_mm"] = stat(cat[key], np.median)
    out["ade_p90_mm"] = stat(cat["ade_mm"], lambda x: np.percentile(x, 90))
    out["label_end_disp_median_mm"] = stat(cat["label_disp_mm"], np.median)
    out["truth_end_disp_median_mm"] = stat(cat["truth_disp_mm"], np.median)
    # Share of the moving points' true future steps the labels keep (the rest were lost).
    with_cov = [p for p in parts if p["coverage"] is not None]
    w = np.array([p["moving_points"] for p in with_cov], np.float64)
    cov = np.array([p["coverage"] for p in with_cov])
    out["coverage"] = float((cov * w).sum() / w.sum()) if w.sum() else None
    return out


def evaluate(
    episodes_dir: Path | list[Path],
    points: int,
    progress: bool = True,
    reseed_every: int = 4,
    target_kinds: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    import dataclasses

    import numpy as np
    from tqdm.auto import tqdm

    from mu0_core.extract.pipeline import ExtractConfig, cut_samples, extract_episode
    from mu0_core.extract.sources import open_source

    dirs = [episodes_dir] if isinstance(episodes_dir, (str, Path)) else list(episodes_dir)
    config = ExtractConfig(num_points=points, reseed_every=reseed_every)
    kinds = TARGET_KINDS if target_kinds is None else target_kinds
    labels: dict[str, list] = {k: [] for k in kinds}
    by_dir: dict[str, dict[str, list]] = {str(d): {k: [] for k in kinds} for d in dirs}
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
    sources = [(str(d), open_source(d)) for d in dirs]
    jobs = [(d, source, eid) for d, source in sources for eid in source.episode_ids()]
    for d, source, eid in tqdm(jobs, desc="bench extract", unit="ep", disable=not progress):
        ep = source.load(eid)
        start = time.perf_counter()
        traces = extract_episode(ep, config)
        seconds += time.perf_counter() - start
        for name, fields in kinds.items():
            samples, _ = cut_samples(traces, dataclasses.replace(config, **fields))
            part = label_errors(traces, samples)
            if fields.get("target") == "arc":  # its truth covers the label's steps only
                part["coverage"] = None
            labels[name].append(part)
            by_dir[d][name].append(part)
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
        "episodes": len(jobs),
        "labels": {name: summarise_labels(parts) for name, parts in labels.items()},
        "labels_by_data": {
            d: {name: summarise_labels(parts) for name, parts in per.items()}
            for d, per in by_dir.items()
            if len(dirs) > 1
        },
        "label_goal_mm": LABEL_GOAL_MM,
    }


def label_table(labels: dict[str, dict[str, Any]]) -> str:
    """A markdown table of ``summarise_labels`` per target kind."""
    cols = [
        ("ade_median_mm", "ADE median"),
        ("ade_mean_mm", "ADE mean"),
        ("ade_p90_mm", "ADE p90"),
        ("fde_median_mm", "FDE median"),
        ("fde_mean_mm", "FDE mean"),
        ("static_ade_mean_mm", "no-motion ADE mean"),
        ("label_end_disp_median_mm", "label end disp. median"),
        ("truth_end_disp_median_mm", "true end disp. median"),
    ]
    lines = [
        "labels vs truth, moving points (mm) | "
        + " | ".join(c[1] for c in cols)
        + " | kept | points",
        "|".join(["---"] * (len(cols) + 3)),
    ]
    for name, m in labels.items():
        cells = [f"{m[k]:.1f}" if m.get(k) is not None else "-" for k, _ in cols]
        cov = f"{m['coverage']:.0%}" if m.get("coverage") is not None else "-"
        lines.append(f"{name} | " + " | ".join(cells) + f" | {cov} | {m['scored_points']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from envs.collect import CollectConfig, collect
    from runtime.commands.bench import write_json

    with tempfile.TemporaryDirectory(prefix="mu0-bench-extract-") as tmp:
        if args.data:
            result = evaluate(args.data, args.points, reseed_every=args.reseed_every)
            result.update(data=[str(d) for d in args.data])
        else:
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
                collect_success_rate=summary["success_rate"],
            )
    result.update(
        points_per_episode=args.points,
        reseed_every=args.reseed_every,
        goal={"track_err_px_median": 2.0, "track_err_mm_median": 10.0},
    )
    what = ", ".join(str(d) for d in args.data) if args.data else f"{args.task}/{args.robot}"
    print(
        f"extract vs truth ({result['episodes']} episodes of {what}): "
        f"moving points: median 2D {result['track_err_px_median']:.2f} px, "
        f"3D {result['track_err_mm_median']:.1f} mm (all points: {result['track_err_px_median_all']:.2f} px, "
        f"{result['track_err_mm_median_all']:.1f} mm; valid {result['share_valid']:.0%}), "
        f"{result['frames_per_s']:.1f} frames/s"
    )
    print(label_table(result["labels"]))
    for d, per in result["labels_by_data"].items():
        print(f"\n{d}\n" + label_table(per))
    write_json(args.json, result)
    return 0
