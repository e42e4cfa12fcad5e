"""Cut the example frame `mu0 predict` shows from a trace dataset of a simulated episode.

    python scripts/make_example_frame.py outputs/heldout/traces/heldout_seeds/Stack-UR5e \
        --name stack_ur5e

Picks, unless --episode/--frame say otherwise, the sample whose points move most in the
simulator's truth, and keeps up to --points of its query points (the moving ones first).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    from mu0_core.examples import HERE, save_example
    from mu0_core.trace_dataset import TraceDataset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--episode", default=None)
    p.add_argument("--frame", type=int, default=None)
    p.add_argument("--points", type=int, default=32)
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args()

    ds = TraceDataset(args.dataset)
    meta = {e["id"]: e for e in ds.meta["episodes"]}

    def moving_count(item) -> int:
        gt, ok = item["gt_future_uvz"], item["gt_future_valid"]
        disp = np.abs(gt - gt[:, :1]).max(-1).max(-1, where=ok, initial=0.0)
        return int((item["point_mask"] & (disp > 0.05)).sum())

    if args.episode is not None and args.frame is not None:
        best = next(
            i
            for i in range(len(ds))
            if ds.locate(i)[0] == args.episode and ds[i]["frame"] == args.frame
        )
    else:
        best = max(range(0, len(ds), 3), key=lambda i: moving_count(ds[i]))
    item = ds[best]
    gt, ok = item["gt_future_uvz"], item["gt_future_valid"]
    disp = np.abs(gt - gt[:, :1]).max(-1).max(-1, where=ok, initial=0.0)
    known = np.flatnonzero(item["point_mask"])
    order = known[np.argsort(-disp[known], kind="stable")][: args.points]
    keep = np.sort(order)
    arrays = {
        "rgb": item["rgb"],
        "depth_m": item["depth_m"],
        "intrinsics": item["intrinsics"],
        "hist_uvz": item["hist_uvz"][keep],
        "hist_valid": item["hist_valid"][keep],
        "gt_future_uvz": gt[keep],
        "gt_future_valid": ok[keep],
    }
    e = meta[item["episode"]]
    info = {
        "instruction": item["instruction"],
        "task": e["task"],
        "robot": e["robot"],
        "episode": item["episode"],
        "frame": int(item["frame"]),
        "source": str(args.dataset),
    }
    save_example(args.name, arrays, info, args.out)
    print(f"{args.name}: {info}, {len(keep)} points")


if __name__ == "__main__":
    main()
