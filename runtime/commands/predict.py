"""`mu0 predict`: one prediction, printed and drawn over the image.

Without inputs it forecasts on a real simulated frame that ships with the package
(``mu0_core.examples``: RGB-D, query points with their real history, and the simulator's
true futures, drawn beside the forecast and scored on the points that move); with ``--rgb``
it reads a PNG/JPEG, an optional depth ``.npy`` in metres, the intrinsics and query pixels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from runtime.serve import add_release_args, load_published


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="forecast traces for one image and draw them")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="model preset (default: tiny, untrained)")
    src.add_argument("--checkpoint", default=None, help="a μ0 checkpoint directory")
    p.add_argument(
        "--rgb", type=Path, default=None, help="image file (PNG/JPEG); default: a shipped frame"
    )
    p.add_argument(
        "--example",
        default=None,
        help="a shipped frame (mu0_core/examples; default: stack_ur5e), or 'synthetic' for "
        "a synthetic scene",
    )
    p.add_argument("--depth", type=Path, default=None, help="depth in metres, .npy float32[H, W]")
    p.add_argument("--intrinsics", default=None, help="fx,fy,cx,cy in pixels (needed with --rgb)")
    p.add_argument("--points", default=None, help='query pixels "u,v;u,v;..." (needed with --rgb)')
    p.add_argument("--instruction", default=None, help="what should happen")
    p.add_argument("--num-points", type=int, default=16, help="query points of the synthetic scene")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the model's)")
    p.add_argument(
        "--noise-scale", type=float, default=None, help="sampler temperature (default: the model's)"
    )
    add_release_args(p)
    p.add_argument("--out", type=Path, default=Path("outputs/predict.png"), help="picture to write")
    p.set_defaults(func=run)


def _query_from_files(args: argparse.Namespace):
    import numpy as np

    from mu0_core.geometry import pixels_to_uv
    from mu0_core.types import HISTORY_STEPS, TraceQuery

    if not (args.intrinsics and args.points and args.instruction):
        raise SystemExit("mu0 predict: --rgb needs --intrinsics, --points and --instruction")
    import matplotlib.image as mpimg

    rgb = mpimg.imread(args.rgb)
    if rgb.dtype != np.uint8:  # matplotlib reads PNG as float in [0, 1]
        rgb = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    rgb = np.ascontiguousarray(rgb[..., :3])
    H, W = rgb.shape[:2]
    depth = None
    if args.depth:
        depth = np.load(args.depth, allow_pickle=False).astype(np.float32)
        if depth.shape != (H, W):
            raise SystemExit(f"mu0 predict: depth {depth.shape} does not match the image {(H, W)}")
    fx, fy, cx, cy = (float(x) for x in args.intrinsics.split(","))
    px = np.array(
        [[float(c) for c in p.split(",")] for p in args.points.split(";")], dtype=np.float32
    )
    uv = pixels_to_uv(px, W, H)
    if depth is not None:
        z = depth[
            np.clip(px[:, 1].round().astype(int), 0, H - 1),
            np.clip(px[:, 0].round().astype(int), 0, W - 1),
        ]
    else:
        z = np.ones(
            len(px), dtype=np.float32
        )  # unknown depth: 1 m, 3D outputs are then only up to scale
    cur = np.concatenate([uv, z[:, None]], axis=1)
    hist = np.repeat(cur[:, None], HISTORY_STEPS, axis=1)  # a single frame: no past motion
    valid = np.zeros(hist.shape[:2], dtype=bool)
    valid[:, -1] = True
    return TraceQuery(
        rgb=rgb,
        instruction=args.instruction,
        hist_uvz=hist,
        intrinsics=(fx, fy, cx, cy),
        depth_m=depth,
        hist_valid=valid,
    )


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from mu0_core import synthetic
    from mu0_core.published.release import is_release_dir
    from mu0_core.viz import draw_traces
    from runtime.commands.info import load_model_from_args

    if args.checkpoint and is_release_dir(args.checkpoint):
        return _run_published(args)
    model, source, _ = load_model_from_args(args)
    truth = None
    if args.rgb:
        query = _query_from_files(args)
    elif args.example == "synthetic":
        size = getattr(model.cfg.backbone, "image_size", None) or 224
        query = synthetic.make_query(args.num_points, image_size=(size, size), seed=args.seed)
    else:
        from mu0_core.examples import DEFAULT, load_example

        query, truth = load_example(args.example or DEFAULT)
        source += f"; frame {truth['frame']} of {truth['task']}-{truth['robot']} {truth['episode']}"
    if args.instruction:
        query = type(query)(**{**query.__dict__, "instruction": args.instruction})
    pred = model.sample(query, num_steps=args.steps, seed=args.seed, noise_scale=args.noise_scale)
    xyz = pred.traces_xyz_cam.numpy()
    travel = np.linalg.norm(xyz[:, -1] - xyz[:, 0], axis=-1)
    print(f"μ0 — {source}")
    print(f"  instruction: {query.instruction!r}; {len(travel)} query points")
    print(
        f"  predicted 3D travel over the horizon: median {1e3 * np.median(travel):.1f} mm, "
        f"max {1e3 * travel.max():.1f} mm; done by the end: {int(pred.done[:, -1].sum())}/{len(travel)}"
    )
    if truth is not None:
        print("  " + _score_against_truth(query, pred, truth))
    print("  timings: " + ", ".join(f"{k} {v:.1f} ms" for k, v in pred.timings_ms.items()))
    path = draw_traces(
        np.asarray(query.rgb),
        pred.traces_uvz.numpy(),
        args.out,
        hist_uvz=np.asarray(query.hist_uvz),
        hist_valid=None if query.hist_valid is None else np.asarray(query.hist_valid, bool),
        true_uvz=None if truth is None else truth["gt_future_uvz"],
        # Drawn up to "done" only where the model stops there (arc-length targets); over a
        # window the forecast goes on past the step its track is expected to be lost.
        done=pred.done.numpy() if model.cfg.trace.hold_after_done else None,
        title=f"{source}\n{query.instruction}"
        + ("" if truth is None else " (truth: green dashes)"),
    )
    print(f"  picture: {path}")
    return 0


def _score_against_truth(query, pred, truth) -> str:
    """One line: the forecast's 3D error on the points that move, beside "no motion"."""
    import numpy as np

    from mu0_core.evaluate import MOVING_THRESHOLD_M
    from mu0_core.geometry import uvz_to_xyz

    rgb = np.asarray(query.rgb)
    size = np.array([rgb.shape[1], rgb.shape[0]], np.float64)
    K = np.asarray(query.intrinsics, np.float64)
    gt = uvz_to_xyz(truth["gt_future_uvz"].astype(np.float64), K, size)  # [N, H, 3]
    ok = truth["gt_future_valid"]
    cur = gt[:, :1]
    pred_xyz = pred.traces_xyz_cam.numpy().astype(np.float64)
    dist = np.where(ok, np.linalg.norm(gt - cur, axis=-1), 0.0)
    moving = dist.max(-1) > MOVING_THRESHOLD_M
    if not moving.any():
        return "against the truth: no query point moves in this frame's window"
    err = np.linalg.norm(pred_xyz - gt, axis=-1)
    ade = (np.where(ok, err, 0.0).sum(-1) / ok.sum(-1).clip(1))[moving].mean()
    still = (dist.sum(-1) / ok.sum(-1).clip(1))[moving].mean()
    return (
        f"against the simulator's truth, {int(moving.sum())} moving points: ADE3D "
        f"{1e3 * ade:.1f} mm (no motion: {1e3 * still:.1f} mm)"
    )


def _run_published(args: argparse.Namespace) -> int:
    """One prediction of the published μ0, through the same adapter the server uses."""
    import time

    import numpy as np

    from mu0_core import synthetic
    from mu0_core.viz import draw_traces

    if args.noise_scale is not None or args.steps is not None:
        raise SystemExit(
            "mu0 predict: the published μ0 runs its own sampler; drop --noise-scale/--steps"
        )
    adapter = load_published(args, seed=args.seed)
    if args.rgb:
        query = _query_from_files(args)
    elif args.example == "synthetic":
        query = synthetic.make_query(args.num_points, image_size=(224, 224), seed=args.seed)
    else:
        from mu0_core.examples import DEFAULT, load_example

        query, _ = load_example(args.example or DEFAULT)
    obs = {
        "rgb": np.asarray(query.rgb),
        "instruction": args.instruction or query.instruction,
        "hist_uvz": np.asarray(query.hist_uvz, dtype=np.float32),
        "intrinsics": np.asarray(query.intrinsics, dtype=np.float32),
    }
    if query.depth_m is not None:
        obs["depth_m"] = np.asarray(query.depth_m, dtype=np.float32)
    if query.hist_valid is not None:
        obs["hist_valid"] = np.asarray(query.hist_valid, dtype=bool)
    adapter.validate(obs)
    t = time.perf_counter()
    pred = adapter.predict_batch([obs])[0]
    ms = 1e3 * (time.perf_counter() - t)
    xyz = pred["traces_xyz_cam"]
    travel = np.linalg.norm(xyz[:, -1] - xyz[:, 0], axis=-1)
    print(f"μ0 — published release {args.checkpoint}")
    print(f"  instruction: {obs['instruction']!r}; {len(travel)} query points")
    print(
        f"  predicted 3D travel over the horizon: median {1e3 * np.median(travel):.1f} mm, "
        f"max {1e3 * travel.max():.1f} mm; done by the end: {int(pred['done'][:, -1].sum())}/{len(travel)}"
    )
    print(f"  timings: total {ms:.1f} ms")
    path = draw_traces(
        obs["rgb"],
        pred["traces_uvz"],
        args.out,
        hist_uvz=obs["hist_uvz"],
        done=pred["done"],
        title=f"published μ0\n{obs['instruction']}",
    )
    print(f"  picture: {path}")
    return 0
