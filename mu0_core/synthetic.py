"""Synthetic trace batches: physically consistent fake inputs, so tests, benchmarks and server
warm-up need no dataset.

A scene has a few rigid objects (coloured discs in the image, with matching depth) in front of
an OpenCV pinhole camera. Each object translates along a smooth curve in 3D; its points are
projected through the intrinsics, so history, future, image and depth agree with each other.
"""

from __future__ import annotations

import numpy as np
import torch

from mu0_core.geometry import project, xyz_to_uvz
from mu0_core.types import HISTORY_STEPS, HORIZON, TraceBatch, TraceQuery

INSTRUCTIONS = ("push the object left", "push the object right", "lift the object up")
# Motion direction in the camera frame for each instruction (x right, y down).
_DIRECTIONS = {0: (-1.0, 0.0, 0.0), 1: (1.0, 0.0, 0.0), 2: (0.0, -1.0, 0.0)}


def make_scene(
    rng: np.random.Generator,
    num_points: int,
    image_size: tuple[int, int] = (160, 160),
    history_steps: int = HISTORY_STEPS,
    horizon: int = HORIZON,
    num_objects: int = 2,
) -> dict[str, np.ndarray | str]:
    """One frame: rgb, depth, instruction, intrinsics and the points' past and future."""
    W, H = image_size
    fx = fy = 0.9 * W
    cx, cy = (W - 1) / 2.0, (H - 1) / 2.0
    task = int(rng.integers(len(INSTRUCTIONS)))
    direction = np.array(_DIRECTIONS[task])

    centers = np.stack(
        [
            rng.uniform(-0.15, 0.15, num_objects),
            rng.uniform(-0.1, 0.1, num_objects),
            rng.uniform(0.7, 1.1, num_objects),
        ],
        axis=1,
    )  # [K, 3] camera frame, metres
    radius = rng.uniform(0.03, 0.05, num_objects)
    mover = int(rng.integers(num_objects))  # the instruction moves one object
    colors = rng.integers(60, 255, size=(num_objects, 3))

    # Points on the objects, assigned round-robin so every object gets some.
    obj_of_point = np.arange(num_points) % num_objects
    angle = rng.uniform(0, 2 * np.pi, num_points)
    r = radius[obj_of_point] * np.sqrt(rng.uniform(0, 0.8, num_points))
    offsets = np.stack([r * np.cos(angle), r * np.sin(angle), np.zeros(num_points)], axis=1)

    # Time: history steps -T+1..0, future steps 0..H-1 (step 0 of the future is "now").
    steps = np.arange(-history_steps + 1, horizon).astype(np.float64)  # [T + H - 1]
    s = np.clip(steps, 0, None) / (horizon - 1)  # progress; static before "now"
    past = np.clip(-steps, 0, None) / (horizon - 1)
    distance = rng.uniform(0.05, 0.15)
    ease = 3 * s**2 - 2 * s**3  # smooth start and stop
    path = (ease * distance)[:, None] * direction + (np.sin(np.pi * s) * 0.02)[:, None] * np.array(
        [0, 0, -1.0]
    )
    # Before "now" the mover was already drifting slowly the same way (so history is informative).
    path = path - (past * distance * 0.2)[:, None] * direction
    pos = centers[obj_of_point][None] + offsets[None]  # [S, N, 3]
    moving = obj_of_point == mover
    pos = pos + path[:, None, :] * moving[None, :, None]

    intr = np.array([fx, fy, cx, cy], dtype=np.float32)
    size = np.array([W, H], dtype=np.float32)
    uvz = np.asarray(xyz_to_uvz(pos, intr, size), dtype=np.float32)  # [S, N, 3]
    uvz = uvz.transpose(1, 0, 2)  # [N, S, 3]
    hist = uvz[:, :history_steps]
    future = uvz[:, history_steps - 1 :]

    # Render the current frame: objects as discs, nearest last.
    rgb = np.full((H, W, 3), 40, dtype=np.uint8)
    depth = np.full((H, W), 1.5, dtype=np.float32)
    vv, uu = np.mgrid[0:H, 0:W]
    now = centers.copy()
    now[mover] += path[history_steps - 1]
    for k in np.argsort(-now[:, 2]):
        (u, v), z = project(now[k], fx, fy, cx, cy)
        rad_px = fx * radius[k] / z
        inside = (uu - u) ** 2 + (vv - v) ** 2 <= rad_px**2
        rgb[inside] = colors[k]
        depth[inside] = z

    return {
        "rgb": rgb,
        "depth_m": depth,
        "instruction": INSTRUCTIONS[task],
        "intrinsics": intr,
        "image_size": np.array([W, H]),
        "hist_uvz": hist,
        "future_uvz": future,
        "group_id": obj_of_point.astype(np.int64),
    }


def make_batch(
    batch_size: int,
    num_points: int,
    image_size: tuple[int, int] = (160, 160),
    seed: int = 0,
    history_steps: int = HISTORY_STEPS,
    horizon: int = HORIZON,
) -> TraceBatch:
    rng = np.random.default_rng(seed)
    scenes = [
        make_scene(rng, num_points, image_size, history_steps, horizon) for _ in range(batch_size)
    ]

    def stack(key, dtype=None):
        return torch.as_tensor(np.stack([s[key] for s in scenes]), dtype=dtype)

    B, N = batch_size, num_points
    return TraceBatch(
        hist_uvz=stack("hist_uvz", torch.float32),
        hist_valid=torch.ones(B, N, history_steps, dtype=torch.bool),
        future_uvz=stack("future_uvz", torch.float32),
        future_valid=torch.ones(B, N, horizon, dtype=torch.bool),
        point_mask=torch.ones(B, N, dtype=torch.bool),
        intrinsics=stack("intrinsics", torch.float32),
        image_size=stack("image_size", torch.float32),
        instructions=[s["instruction"] for s in scenes],
        rgb=stack("rgb"),
        depth_m=stack("depth_m", torch.float32),
        group_id=stack("group_id", torch.int64),
    )


def make_query(
    num_points: int, image_size: tuple[int, int] = (160, 160), seed: int = 0
) -> TraceQuery:
    scene = make_scene(np.random.default_rng(seed), num_points, image_size)
    return TraceQuery(
        rgb=scene["rgb"],
        instruction=scene["instruction"],
        hist_uvz=scene["hist_uvz"],
        intrinsics=tuple(float(x) for x in scene["intrinsics"]),
        depth_m=scene["depth_m"],
    )


class SyntheticTraceDataset:
    """Items in the trace-dataset contract (``mu0_core.trace_dataset``) from synthetic scenes.

    Deterministic: item i is always the same scene. For tests and smoke runs of pretraining.
    """

    def __init__(
        self,
        size: int,
        num_points: int = 16,
        image_size: tuple[int, int] = (160, 160),
        seed: int = 0,
    ):
        self.size, self.num_points, self.image_size, self.seed = size, num_points, image_size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(i)
        s = make_scene(np.random.default_rng([self.seed, i]), self.num_points, self.image_size)
        N = self.num_points
        return {
            "rgb": s["rgb"],
            "depth_m": s["depth_m"],
            "intrinsics": s["intrinsics"],
            "image_size": s["image_size"],
            "hist_uvz": s["hist_uvz"],
            "hist_valid": np.ones(s["hist_uvz"].shape[:2], dtype=bool),
            "future_uvz": s["future_uvz"],
            "future_valid": np.ones(s["future_uvz"].shape[:2], dtype=bool),
            "point_mask": np.ones(N, dtype=bool),
            "group_id": s["group_id"],
            "instruction": s["instruction"],
            "caption": s["instruction"],
            "episode": f"synthetic-{i}",
            "frame": 0,
        }
