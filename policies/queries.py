"""Which points an action expert asks μ0 about, and how replies become base-frame traces.

Query 0 is the gripper: its grip site, whose position the robot knows (proprio, in the base
frame), projected into the camera with the calibration ``T_base_cam``, with a true 8-step
history. Queries 1.. are scene points picked from pixels alone: Shi–Tomasi corners of the
current image where depth is valid (objects, their edges, the arm), topped up with a grid when
the image has few corners. Scene points carry no history (only the current step is valid),
which pretraining covers with its history-masking augmentation.

Frames go through ``mu0_core.geometry``; corners come from OpenCV.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from mu0_core.geometry import invert_transform, transform_points, uv_to_pixels, xyz_to_uvz
from runtime.model_api import HISTORY_STEPS, uvz_to_xyz_cam

DEFAULT_SCENE_POINTS = 32


def scene_points(
    rgb: np.ndarray, depth_m: np.ndarray, num: int = DEFAULT_SCENE_POINTS, min_distance: float = 5.0
) -> np.ndarray:
    """Pixels (u, v) float32[num, 2] to query: corners where depth is valid, then a grid."""
    from mu0_core.extract import import_cv2

    cv2 = import_cv2()
    H, W = depth_m.shape
    ok = np.isfinite(depth_m) & (depth_m > 0.05) & (depth_m < 5.0)
    # Leave out the far background (walls): the farthest fifth of the valid depths.
    if ok.any():
        ok &= depth_m <= np.quantile(depth_m[ok], 0.8)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    pts = cv2.goodFeaturesToTrack(
        gray,
        maxCorners=num,
        qualityLevel=0.01,
        minDistance=min_distance,
        mask=ok.astype(np.uint8) * 255,
        blockSize=3,
    )
    uv = np.zeros((0, 2), np.float32) if pts is None else pts.reshape(-1, 2).astype(np.float32)
    if len(uv) < num:  # top up with a grid over the valid pixels
        side = int(np.ceil(np.sqrt(num)))
        gu, gv = np.meshgrid(np.linspace(0.1, 0.9, side) * W, np.linspace(0.2, 0.9, side) * H)
        grid = np.stack([gu.ravel(), gv.ravel()], axis=-1).astype(np.float32)
        keep = ok[grid[:, 1].astype(int).clip(0, H - 1), grid[:, 0].astype(int).clip(0, W - 1)]
        uv = np.concatenate([uv, grid[keep], grid[~keep]])[:num]
    return uv


class QueryBuilder:
    """Keeps the gripper's history and builds the wire observation for each frame.

    Call ``observe(...)`` once per control step (it records the gripper position), and
    ``build(...)`` when a trace request goes out.
    """

    def __init__(self, num_scene_points: int = DEFAULT_SCENE_POINTS):
        self.num_scene_points = num_scene_points
        self._eef: deque[np.ndarray] = deque(maxlen=HISTORY_STEPS)

    def reset(self) -> None:
        self._eef.clear()

    def observe(self, eef_pos_base: np.ndarray) -> None:
        self._eef.append(np.asarray(eef_pos_base, np.float64).copy())

    def build(
        self,
        rgb: np.ndarray,
        depth_m: np.ndarray,
        intrinsics: np.ndarray,
        T_base_cam: np.ndarray,
        instruction: str,
    ) -> dict[str, Any]:
        """→ the observation dict of the wire protocol (docs/protocol.md), plus nothing else."""
        if not self._eef:
            raise RuntimeError("QueryBuilder.build before any observe(eef_pos_base)")
        H, W = depth_m.shape
        T_cam_base = invert_transform(np.asarray(T_base_cam, np.float64))
        T = HISTORY_STEPS
        eef = np.stack(list(self._eef))  # [k, 3], oldest first
        k = len(eef)
        grip_uvz = np.zeros((T, 3), np.float32)
        grip_uvz[T - k :] = xyz_to_uvz(
            transform_points(T_cam_base, eef), np.asarray(intrinsics, np.float64), (W, H)
        )
        grip_valid = np.zeros(T, bool)
        grip_valid[T - k :] = True

        uv = scene_points(rgb, depth_m, self.num_scene_points)
        ui = np.round(uv[:, 0]).astype(int).clip(0, W - 1)
        vi = np.round(uv[:, 1]).astype(int).clip(0, H - 1)
        z = depth_m[vi, ui]
        z = np.where(np.isfinite(z) & (z > 0), z, np.nanmedian(depth_m))
        scene = np.stack([(2 * uv[:, 0] + 1) / W - 1, (2 * uv[:, 1] + 1) / H - 1, z], -1)
        hist = np.zeros((1 + len(uv), T, 3), np.float32)
        hist[0] = grip_uvz
        hist[1:, -1] = scene
        valid = np.zeros((1 + len(uv), T), bool)
        valid[0] = grip_valid
        valid[1:, -1] = True
        return {
            "rgb": np.ascontiguousarray(rgb, dtype=np.uint8),
            "depth_m": np.ascontiguousarray(depth_m, dtype=np.float32),
            "instruction": instruction,
            "hist_uvz": hist,
            "hist_valid": valid,
            "intrinsics": np.asarray(intrinsics, np.float32),
        }


def point_colors(obs: dict[str, Any], radius: int = 1) -> np.ndarray:
    """The colour of every query of a wire observation where it is now: float32[N, 3] in
    [0, 1], the mean RGB of the (2 radius + 1)² pixels around it. Positions alone do not tell
    the red cube from the green one, nor an object from the arm's edge beside it."""
    rgb = np.asarray(obs["rgb"])
    H, W = rgb.shape[:2]
    uv = np.asarray(obs["hist_uvz"], np.float64)[:, -1, :2]
    px = uv_to_pixels(uv, W, H)
    u = np.round(px[:, 0]).astype(int)[:, None] + np.arange(-radius, radius + 1)[None]
    v = np.round(px[:, 1]).astype(int)[:, None] + np.arange(-radius, radius + 1)[None]
    u, v = u.clip(0, W - 1), v.clip(0, H - 1)
    patch = rgb[v[:, :, None], u[:, None, :]]  # [N, k, k, 3]
    return (patch.reshape(len(uv), -1, 3).mean(1) / 255.0).astype(np.float32)


def traces_to_base(traces_xyz_cam: np.ndarray, T_base_cam: np.ndarray) -> np.ndarray:
    """float32[N, H, 3] camera-frame traces → the robot base frame."""
    T = np.asarray(T_base_cam, np.float64)
    return transform_points(T, traces_xyz_cam.astype(np.float64)).astype(np.float32)


def query_points_cam(obs: dict[str, Any]) -> np.ndarray:
    """The current 3D position (camera frame) of every query of a wire observation: [N, 3]."""
    H, W = obs["depth_m"].shape
    return uvz_to_xyz_cam(obs["hist_uvz"][:, -1], obs["intrinsics"], W, H)
