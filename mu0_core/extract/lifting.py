"""2D tracks -> 3D traces in one world frame; and the simulator's truth for the same points.

Depth is read where the track is: bilinearly where the four neighbouring depths agree, at
the nearest pixel across a depth edge (averaging a cube's edge with the table behind it
would invent a point in mid-air). A sudden depth jump along a track means something came
in front of the point (or the track slid onto another surface): those steps are invalid.
"""

from __future__ import annotations

import numpy as np

from mu0_core.geometry import invert_transform, transform_points, unproject, xyz_to_uvz


def sample_depth(
    depth_m: np.ndarray, uv_px: np.ndarray, edge_rel: float = 0.03
) -> tuple[np.ndarray, np.ndarray]:
    """depth_m: float32[H, W] (0 = unknown), uv_px: [N, 2] -> (z float64[N], ok bool[N])."""
    H, W = depth_m.shape
    u = np.clip(uv_px[:, 0], 0, W - 1)
    v = np.clip(uv_px[:, 1], 0, H - 1)
    u0 = np.clip(np.floor(u).astype(int), 0, W - 2)
    v0 = np.clip(np.floor(v).astype(int), 0, H - 2)
    du, dv = u - u0, v - v0
    d = np.stack(
        [depth_m[v0, u0], depth_m[v0, u0 + 1], depth_m[v0 + 1, u0], depth_m[v0 + 1, u0 + 1]], 1
    ).astype(np.float64)  # [N, 4]
    w = np.stack([(1 - du) * (1 - dv), du * (1 - dv), (1 - du) * dv, du * dv], 1)
    known = np.isfinite(d) & (d > 0)
    bilinear = (d * w).sum(1)
    spread = np.where(known, d, np.nan)
    smooth = known.all(1) & (
        np.nanmax(spread, 1) - np.nanmin(spread, 1) <= edge_rel * np.nanmin(spread, 1)
    )
    nearest = d[np.arange(len(d)), np.argmax(w, 1)]
    nearest_ok = known[np.arange(len(d)), np.argmax(w, 1)]
    z = np.where(smooth, bilinear, nearest)
    ok = smooth | nearest_ok
    return np.where(ok, z, 0.0), ok


def lift_tracks(
    uv_px: np.ndarray,
    visible: np.ndarray,
    depth_m: np.ndarray,
    intrinsics: np.ndarray,
    T_world_cam: np.ndarray,
    max_jump_m: float = 0.04,
    max_jump_rel: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """Tracks [F, N, 2] + depth [F, H, W] + intrinsics [F, 4] + poses [F, 4, 4]
    -> (xyz_world float64[F, N, 3], valid bool[F, N]).

    A step is valid when the track is visible, depth is known there, and camera-frame depth
    stays within ``max_jump_m + max_jump_rel * z`` of the point's last valid depth.
    """
    F, N, _ = uv_px.shape
    z = np.zeros((F, N))
    ok = np.zeros((F, N), bool)
    for t in range(F):
        z[t], ok[t] = sample_depth(depth_m[t], uv_px[t])
    ok &= visible
    # Depth consistency against the last valid depth, so a brief occluder is cut out and
    # the point comes back when it is seen again at the depth it had.
    last = np.full(N, np.nan)
    for t in range(F):
        jump = np.abs(z[t] - last) > max_jump_m + max_jump_rel * np.nan_to_num(last, nan=0.0)
        ok[t] &= ~(np.isfinite(last) & jump)
        last = np.where(ok[t], z[t], last)
    K = intrinsics.astype(np.float64)
    xyz_cam = unproject(
        uv_px.astype(np.float64), z, K[:, 0], K[:, 1], K[:, 2], K[:, 3]
    )  # [F, N, 3]
    xyz_world = transform_points(T_world_cam.astype(np.float64), xyz_cam)
    return np.where(ok[..., None], xyz_world, np.nan), ok


def world_to_camera_uvz(
    xyz_world: np.ndarray, T_world_cam: np.ndarray, intrinsics: np.ndarray, image_size: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """xyz_world [B, ..., 3] in camera b's frame -> (uvz [B, ..., 3], xyz_cam [B, ..., 3]).

    T_world_cam [B, 4, 4], intrinsics [B, 4], image_size [B, 2] (width, height): one per
    leading index (batch-first, ``mu0_core.geometry``).
    """
    xyz_cam = transform_points(invert_transform(T_world_cam.astype(np.float64)), xyz_world)
    with np.errstate(divide="ignore", invalid="ignore"):  # invalid steps sit at z = 0; masked later
        return xyz_to_uvz(xyz_cam, intrinsics.astype(np.float64), image_size), xyz_cam


# ---------------------------------------------------------------------------
# Simulator truth for tracked points (evaluation only)


def quat_wxyz_to_matrix(q: np.ndarray) -> np.ndarray:
    """[..., 4] unit quaternions (w, x, y, z) -> [..., 3, 3] rotation matrices."""
    q = np.asarray(q, np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    R = np.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        -1,
    )  # fmt: skip
    return R.reshape(*q.shape[:-1], 3, 3)


def body_pose_matrices(body_pose: np.ndarray) -> np.ndarray:
    """body_pose float[..., 7] (position, quaternion wxyz) -> T_world_body [..., 4, 4]."""
    T = np.zeros((*body_pose.shape[:-1], 4, 4))
    T[..., :3, :3] = quat_wxyz_to_matrix(body_pose[..., 3:])
    T[..., :3, 3] = body_pose[..., :3]
    T[..., 3, 3] = 1.0
    return T


def attach_to_bodies(
    uv_px0: np.ndarray,
    xyz_world0: np.ndarray,
    body_pose0: np.ndarray,
    segmentation0: np.ndarray | None = None,
) -> np.ndarray:
    """int64[N]: the simulator body each query point lies on, in the query frame.

    With a body-id segmentation (int[H, W], -1 none) the body seen at the point's pixel;
    without one, the body whose origin is nearest the point (cruder: a large body's origin
    can be far from its surface).
    """
    if segmentation0 is not None:
        H, W = segmentation0.shape
        ui = np.clip(np.round(uv_px0[:, 0]).astype(int), 0, W - 1)
        vi = np.clip(np.round(uv_px0[:, 1]).astype(int), 0, H - 1)
        body = segmentation0[vi, ui].astype(np.int64)
        if (body >= 0).all():
            return body
    else:
        body = np.full(len(xyz_world0), -1, np.int64)
    dist = np.linalg.norm(xyz_world0[:, None, :] - body_pose0[None, :, :3], axis=-1)  # [N, B]
    return np.where(body >= 0, body, np.argmin(np.nan_to_num(dist, nan=np.inf), axis=1))


def rigid_body_tracks(
    xyz_world0: np.ndarray, body: np.ndarray, body_pose: np.ndarray, query_frame: int = 0
) -> np.ndarray:
    """Move each point rigidly with its body: xyz_world0 [N, 3] (the points in frame
    ``query_frame``), body int[N], body_pose [F, B, 7] -> xyz_world float64[F, N, 3]."""
    T = body_pose_matrices(body_pose[:, body])  # [F, N, 4, 4]
    p_body = transform_points(invert_transform(T[query_frame]), xyz_world0)  # [N, 3] body frames
    return transform_points(T, np.broadcast_to(p_body, (len(T), *p_body.shape)))
