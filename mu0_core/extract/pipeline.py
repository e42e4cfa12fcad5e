"""TraceExtract end to end: one episode -> trace samples; many episodes in parallel.

Per episode (``extract_episode``): pick keypoints from pixels, track them in 2D (replacing
lost ones with new tracks that start where they are picked), lift them to 3D in the world
frame, flag moving points and cluster rigid groups, segment the motion and caption it,
then cut samples: for each frame t, every point's 8-step history and its future over a fixed
window of H frames (``target="window"``, the default) or re-timed by arc length within that
window (``target="arc"``), both in frame t's camera (``mu0_core.trace_dataset`` holds the
contract; steps before a track starts, and from the step it is lost on, are invalid).

Across episodes (``run_extract``): local processes by default, a Ray job with
``use_ray=True``; each worker opens the source from its JSON spec, extracts one episode
and writes it atomically, so both paths produce the same files, a failed episode is
reported by name while the rest finish, and a rerun skips what is done.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mu0_core import trace_dataset
from mu0_core.extract import ExtractError
from mu0_core.extract.keypoints import motion_saliency, select_keypoints, to_gray
from mu0_core.extract.lifting import (
    attach_to_bodies,
    body_pose_matrices,
    lift_tracks,
    rigid_body_tracks,
    world_to_camera_uvz,
)
from mu0_core.extract.segments import Segment, make_captioner, motion_activity, segment_episode
from mu0_core.extract.sources import RGBDEpisode, open_source
from mu0_core.extract.tracking import Tracker, Tracks, make_tracker, track_with_reseeding
from mu0_core.geometry import invert_transform, transform_points
from mu0_core.traces import (
    future_frames,
    is_moving,
    retime_by_arc_length_batch,
    smooth_tracks,
)
from mu0_core.types import HISTORY_STEPS, HORIZON

RAY_HINT = "`mu0 extract --ray` needs Ray: pip install 'mu0[ray]'"


@dataclass(frozen=True)
class ExtractConfig:
    num_points: int = 96
    history_steps: int = HISTORY_STEPS
    horizon: int = HORIZON
    tracker: str = "lk"  # a registered name or "package.module:factory"
    tracker_kwargs: dict[str, Any] = field(default_factory=dict)
    captioner: str = "rule"  # a registered name or "package.module:factory"
    sample_stride: int = 1  # a sample every this many frames
    # The future target: "window" = the next `horizon` steps, `frame_stride` frames apart, as
    # they happened; "arc" = the same window's path re-timed to equal steps of arc length.
    target: str = "window"
    frame_stride: int = 1
    # Tracks are smoothed over this many frames (odd; 1 = off) before futures are cut; a
    # future is the current position plus the smoothed track's displacement from it.
    smooth_frames: int = 5
    moving_threshold_m: float = 0.02  # path length over the episode that makes a point "moving"
    still_path_m: float = 0.005  # a future shorter than this is a point holding still
    rigid_tolerance_m: float = 0.01  # distance change allowed between points of one rigid group
    moving_share: float = 0.75  # share of keypoints taken where something moves
    # Every this many frames, points lost since are replaced by new tracks starting there
    # (0: never); only once at least `reseed_min_lost` of `num_points` are lost.
    reseed_every: int = 4
    reseed_min_lost: float = 0.1

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.frame_stride < 1 or self.smooth_frames < 1 or self.sample_stride < 1:
            raise ValueError(
                "frame_stride, smooth_frames and sample_stride must be >= 1, got "
                f"{self.frame_stride}, {self.smooth_frames}, {self.sample_stride}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExtractConfig:
        return cls(**d)


TARGETS = ("window", "arc")


@dataclass
class EpisodeTraces:
    """Everything extracted from one episode (F frames, N points, S samples)."""

    episode: RGBDEpisode
    query_uv_px: np.ndarray  # float32[N, 2], each in its query frame
    query_frame: np.ndarray  # int64[N] the frame each track starts at (0, or re-seeded later)
    uv_px: np.ndarray  # float32[F, N, 2] 2D tracks
    visible: np.ndarray  # bool[F, N] from the tracker
    xyz_world: np.ndarray  # float64[F, N, 3] (NaN where not valid)
    valid: np.ndarray  # bool[F, N] visible, depth known and consistent
    moving: np.ndarray  # bool[N]
    group_id: np.ndarray  # int64[N]
    segments: list[Segment]
    captions: list[str]
    samples: dict[str, np.ndarray]  # the per-sample arrays of the contract (N' columns)
    sample_track: np.ndarray  # int64[S, N'] the track in each sample's column, -1 padding
    gt_xyz_world: np.ndarray | None = None  # float64[F, N, 3] simulator truth, if known
    seconds: float = 0.0
    num_points: int = 0  # live tracks asked for per frame (ExtractConfig.num_points)

    def arrays(self) -> dict[str, np.ndarray]:
        ep = self.episode
        return {
            "rgb": ep.rgb.astype(np.uint8),
            "depth_m": ep.depth_m.astype(np.float32),
            "intrinsics": ep.intrinsics.astype(np.float32),
            "T_world_cam": ep.T_world_cam.astype(np.float32),
            **self.samples,
        }

    def strings(self) -> dict[str, Any]:
        seg_of_sample = self.samples["sample_segment"]
        return {
            "instruction": self.episode.instruction,
            "captions": self.captions,
            "sample_caption": [int(s) for s in seg_of_sample],
            "segments": [[s.start, s.end] for s in self.segments],
            "meta": self.meta(),
            "report": self.report(),
        }

    def meta(self) -> dict[str, Any]:
        ep = self.episode
        return {
            "id": ep.id,
            "task": ep.task,
            "robot": ep.robot,
            "instruction": ep.instruction,
            "num_frames": ep.num_frames,
            "num_samples": int(len(self.samples["sample_frame"])),
        }

    def report(self) -> dict[str, Any]:
        ep = self.episode
        F, H, W = ep.depth_m.shape
        N = len(self.query_uv_px)
        # Coverage: share of an 8x8 grid of cells with depth in frame 0 that hold a valid point.
        cells = np.zeros((8, 8), bool)
        if N:
            q = self.uv_px[0][self.valid[0]]
            cells[
                (q[:, 1] * 8 / H).astype(int).clip(0, 7), (q[:, 0] * 8 / W).astype(int).clip(0, 7)
            ] = True
        has_depth = np.zeros((8, 8), bool)
        vv, uu = np.nonzero(ep.depth_m[0] > 0)
        has_depth[(vv * 8 // H), (uu * 8 // W)] = True
        fv = self.samples["future_valid"][self.samples["point_mask"]]
        hv = self.samples["hist_valid"][self.samples["point_mask"]]
        return {
            "points": N,
            "reseeded_points": int((self.query_frame > 0).sum()),
            "moving_points": int(self.moving.sum()),
            "groups": int(len(set(self.group_id[self.group_id >= 0].tolist()))),
            "frames": F,
            "samples": int(len(self.samples["sample_frame"])),
            "segments": len(self.segments),
            "coverage": float(cells.sum() / max(1, has_depth.sum())),
            # Valid points per frame as a share of the points asked for (equal to the share
            # of valid track steps when nothing is re-seeded), and that share over all steps
            # of all tracks, counting the frames before a re-seeded track starts.
            "share_valid": float(self.valid.sum() / (F * max(self.num_points, 1))) if N else 0.0,
            "share_valid_steps": float(self.valid.mean()) if N else 0.0,
            "share_future_valid": float(fv.mean()) if fv.size else 0.0,
            "share_hist_valid": float(hv.mean()) if hv.size else 0.0,
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------------------
# Rigid groups


def rigid_groups(
    xyz_world: np.ndarray,
    valid: np.ndarray,
    moving: np.ndarray,
    tolerance_m: float,
    max_frames: int = 60,
) -> np.ndarray:
    """int64[N] rigid-group ids from motion: two points are rigid when their distance stays
    within ``tolerance_m`` (10th to 90th percentile) over the frames both are valid.

    Static points form group 0; moving points are grouped greedily around the point seen
    longest; points valid in under a quarter of the frames from their first valid one on
    (a track may start mid-episode) get -1 (unknown).
    """
    F, N, _ = xyz_world.shape
    group = np.full(N, -1, np.int64)
    first = np.where(valid.any(0), np.argmax(valid, axis=0), F)
    enough = (valid.sum(0) >= 0.25 * (F - first)) & (valid.sum(0) >= 2)
    group[enough & ~moving] = 0
    cand = np.flatnonzero(enough & moving)
    if len(cand) == 0:
        return group
    frames = np.linspace(0, F - 1, min(F, max_frames)).round().astype(int)
    x = xyz_world[frames][:, cand]  # [T, M, 3]
    v = valid[frames][:, cand]
    d = np.linalg.norm(x[:, :, None] - x[:, None, :], axis=-1)  # [T, M, M]
    both = v[:, :, None] & v[:, None, :]
    d = np.where(both, d, np.nan)
    p10, p90 = _nan_percentiles(d, (10.0, 90.0))
    spread = p90 - p10
    common = both.sum(0) >= max(3, len(frames) // 4)
    rigid = common & (np.nan_to_num(spread, nan=np.inf) <= tolerance_m)
    order = np.argsort(-v.sum(0))
    next_id = 1
    unassigned = np.ones(len(cand), bool)
    for i in order:
        if not unassigned[i]:
            continue
        members = np.flatnonzero(unassigned & rigid[i])
        members = members[members != i]
        group[cand[i]] = next_id
        unassigned[i] = False
        for j in members:
            group[cand[j]] = next_id
            unassigned[j] = False
        next_id += 1
    return group


def _nan_percentiles(x: np.ndarray, qs: tuple[float, ...]) -> list[np.ndarray]:
    """``np.nanpercentile(x, q, axis=0)`` (linear) for each q, vectorised: NaN where a
    column has no values. numpy's own loops over columns in Python when NaNs are present."""
    k = np.isfinite(x).sum(0)  # values per column
    xs = np.sort(np.where(np.isfinite(x), x, np.inf), axis=0)  # values first, in order
    out = []
    for q in qs:
        pos = q / 100.0 * np.maximum(k - 1, 0)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, np.maximum(k - 1, 0))
        a = np.take_along_axis(xs, lo[None], 0)[0]
        b = np.take_along_axis(xs, hi[None], 0)[0]
        with np.errstate(invalid="ignore"):
            v = a + (pos - lo) * np.where(hi > lo, b - a, 0.0)
        out.append(np.where(k > 0, v, np.nan))
    return out


# ---------------------------------------------------------------------------
# Samples


def build_samples(
    ep: RGBDEpisode,
    xyz_world: np.ndarray,
    valid: np.ndarray,
    moving: np.ndarray,
    group_id: np.ndarray,
    segments: list[Segment],
    config: ExtractConfig,
    truth: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The contract's per-sample arrays. A sample is a frame t where at least one point is
    valid; ``point_mask`` marks the points with a known position at t (the queries).

    truth: the simulator's, for evaluation only: {"body_pose" [F, B, 7], "segmentation"
    [F, H, W] or absent, "uv_px" [F, N, 2] the tracks, "body_part" uint8[B] or absent};
    adds ``gt_future_uvz``, ``gt_future_valid`` and ``gt_part`` (see ``truth_targets``)."""
    F, N, _ = xyz_world.shape
    T_h, Hz = config.history_steps, config.horizon
    H, W = ep.depth_m.shape[1:]
    size = np.array([W, H], np.float64)
    seg_of = np.zeros(F, np.int64)
    for k, s in enumerate(segments):
        seg_of[s.start : s.end] = k
    frames = [t for t in range(0, F, config.sample_stride) if valid[t].any()]
    S = len(frames)
    t_arr = np.array(frames, np.int64)
    out = {
        "sample_frame": t_arr,
        "hist_uvz": np.zeros((S, N, T_h, 3), np.float32),
        "hist_valid": np.zeros((S, N, T_h), bool),
        "future_uvz": np.zeros((S, N, Hz, 3), np.float32),
        "future_valid": np.zeros((S, N, Hz), bool),
        "point_mask": np.zeros((S, N), bool),
        "group_id": np.tile(group_id.astype(np.int64), (S, 1)),
        "moving": np.tile(moving.astype(bool), (S, 1)),
        "sample_segment": seg_of[t_arr] if S else np.zeros(0, np.int64),
    }
    if truth is not None:
        out["gt_future_uvz"] = np.zeros((S, N, Hz, 3), np.float32)
        out["gt_future_valid"] = np.zeros((S, N, Hz), bool)
        out["gt_part"] = np.zeros((S, N), np.uint8)
    if S == 0:
        return out
    filled = np.nan_to_num(xyz_world)  # invalid steps are masked; keep the arithmetic finite

    # History: frames t-7 .. t, in frame t's camera; steps before the episode are invalid.
    steps = t_arr[:, None] + np.arange(-T_h + 1, 1)[None, :]  # [S, T_h]
    hist_world = filled[np.clip(steps, 0, F - 1)]  # [S, T_h, N, 3]
    hist_valid = valid[np.clip(steps, 0, F - 1)] & (steps >= 0)[..., None]  # [S, T_h, N]
    uvz, _ = world_to_camera_uvz(
        hist_world, ep.T_world_cam[t_arr], ep.intrinsics[t_arr], np.tile(size, (S, 1))
    )
    # Invalid steps carry no position: zeros, not the NaN/inf of projecting z = 0.
    uvz = np.where(hist_valid[..., None], uvz, 0.0)
    out["hist_uvz"] = np.swapaxes(uvz, 1, 2).astype(np.float32)  # [S, N, T_h, 3]
    out["hist_valid"] = np.swapaxes(hist_valid, 1, 2)
    out["point_mask"] = valid[t_arr]

    fut, fut_ok = future_targets(ep, xyz_world, valid, t_arr, out["point_mask"], config)
    out["future_uvz"], out["future_valid"] = fut, fut_ok
    if truth is not None:
        out["gt_future_uvz"], out["gt_future_valid"], out["gt_part"] = truth_targets(
            ep, xyz_world, t_arr, out["point_mask"], truth, fut_ok, config
        )
    return out


# What a simulator body is, for scoring forecasts by part (``gt_part``).
PART_SCENE, PART_ROBOT, PART_GRIPPER, PART_OBJECT = 0, 1, 2, 3
PART_NAMES = {
    PART_SCENE: "scene",
    PART_ROBOT: "robot",
    PART_GRIPPER: "gripper",
    PART_OBJECT: "object",
}


def body_parts(body_names: list[str], num_bodies: int) -> np.ndarray:
    """uint8[B] the part each body is, from robosuite's naming: ``gripper*`` and ``*_hand``
    the gripper, ``robot*`` the arm, the world, table, mounts and targets the scene, and every
    other body an object (cubes, the can, the door)."""
    out = np.full(num_bodies, PART_SCENE, np.uint8)
    for i, name in enumerate(body_names[:num_bodies]):
        if name.startswith("gripper") or name.endswith("_hand"):
            out[i] = PART_GRIPPER
        elif name.startswith("robot"):
            out[i] = PART_ROBOT
        elif not (
            name in ("world", "table")
            or name.startswith(("fixed_mount", "mount"))
            or name.endswith("_target")
        ):
            out[i] = PART_OBJECT
    return out


def _to_camera_t(ep, world: np.ndarray, t_arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """world [S, Hz, N, 3] -> (uvz, xyz_cam) [S, Hz, N, 3] in each sample frame's camera."""
    H, W = ep.depth_m.shape[1:]
    size = np.tile(np.array([W, H], np.float64), (len(t_arr), 1))
    return world_to_camera_uvz(world, ep.T_world_cam[t_arr], ep.intrinsics[t_arr], size)


def _cut(
    ep,
    world: np.ndarray,
    ok: np.ndarray,
    t_arr: np.ndarray,
    config: ExtractConfig,
    prefix_only: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Futures in world coordinates [S, Hz, N, 3] + ok [S, Hz, N] -> the contract's
    (future_uvz float32[S, N, Hz, 3], future_valid bool[S, N, Hz]) in frame t's camera,
    re-timed by arc length for ``target="arc"``. ``prefix_only``: a step after an invalid
    one is invalid too (a track lost once does not come back as the same point)."""
    uvz, xyz_cam = _to_camera_t(ep, world, t_arr)
    ok = ok & np.isfinite(uvz).all(-1) & (xyz_cam[..., 2] > 0)
    if prefix_only:
        ok = np.cumprod(ok, axis=1).astype(bool)
    uvz = np.swapaxes(np.where(ok[..., None], uvz, 0.0), 1, 2)  # [S, N, Hz, 3]
    xyz_cam = np.swapaxes(np.where(ok[..., None], xyz_cam, 0.0), 1, 2)
    ok = np.swapaxes(ok, 1, 2)  # [S, N, Hz]
    if config.target == "arc":
        S, N, Hz, _ = uvz.shape
        pts, ok_flat = retime_by_arc_length_batch(
            uvz.reshape(S * N, Hz, 3),
            ok.reshape(S * N, Hz),
            Hz,
            min_total_length=config.still_path_m,
            arc_points=xyz_cam.reshape(S * N, Hz, 3),
            keep_length=True,
        )
        uvz, ok = pts.reshape(S, N, Hz, 3), ok_flat.reshape(S, N, Hz)
        uvz = np.where(ok[..., None], uvz, 0.0)
    return uvz.astype(np.float32), ok


def future_targets(
    ep,
    xyz_world: np.ndarray,
    valid: np.ndarray,
    t_arr: np.ndarray,
    known: np.ndarray,
    config: ExtractConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """The extracted futures of every sample's points: step k is frame t + k * frame_stride;
    the future starts at the point's position at t and follows the (smoothed) track's
    displacement from there; invalid once the track is lost or the episode ends."""
    F = len(xyz_world)
    idx, inside = future_frames(t_arr, F, config.horizon, config.frame_stride)  # [S, Hz]
    filled = np.nan_to_num(xyz_world)
    smooth = smooth_tracks(filled, valid, config.smooth_frames)
    world = filled[t_arr][:, None] + (smooth[idx] - smooth[t_arr][:, None])  # [S, Hz, N, 3]
    ok = valid[idx] & inside[..., None] & known[:, None, :]
    return _cut(ep, world, ok, t_arr, config)


def truth_targets(
    ep,
    xyz_world: np.ndarray,
    t_arr: np.ndarray,
    known: np.ndarray,
    truth: dict[str, np.ndarray],
    label_valid: np.ndarray,
    config: ExtractConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The simulator's truth for the same queries, in the same target definition: each
    point's position at t (as extracted) attached to the body seen at its pixel at t and
    moved rigidly with that body over the window. Valid wherever the window is inside the
    episode (the truth does not get lost); for ``target="arc"`` over the same steps as the
    label, so both re-time the same stretch of time. Returns (uvz, valid, part uint8[S, N]
    of the body each point is attached to, ``body_parts``' codes)."""
    F = len(xyz_world)
    idx, inside = future_frames(t_arr, F, config.horizon, config.frame_stride)
    body_pose, seg, uv_px = truth["body_pose"], truth.get("segmentation"), truth["uv_px"]
    x0 = np.nan_to_num(xyz_world[t_arr])  # [S, N, 3]
    world = np.repeat(x0[:, None], config.horizon, axis=1)  # [S, Hz, N, 3]
    part = np.zeros(known.shape, np.uint8)
    for i, t in enumerate(t_arr):
        n = np.flatnonzero(known[i])
        if len(n) == 0:
            continue
        body = attach_to_bodies(
            uv_px[t, n], x0[i, n], body_pose[t], None if seg is None else seg[t]
        )
        if "body_part" in truth:
            part[i, n] = truth["body_part"][body]
        T_t = body_pose_matrices(body_pose[t, body])  # [M, 4, 4]
        p_body = transform_points(invert_transform(T_t), x0[i, n])  # [M, 3]
        T_f = body_pose_matrices(body_pose[idx[i]][:, body])  # [Hz, M, 4, 4]
        world[i][:, n] = transform_points(
            T_f, np.broadcast_to(p_body, (len(idx[i]), *p_body.shape))
        )
    ok = inside[..., None] & known[:, None, :]
    if config.target == "arc":
        ok = ok & np.swapaxes(label_valid, 1, 2)
    return (*_cut(ep, world, ok, t_arr, config, prefix_only=False), part)


def pack_samples(samples: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Keep, in each sample, only the points known at its frame, in as few columns as needed.

    With re-seeding an episode has many more tracks than are ever alive at once, and each
    sample only uses the ones known at its frame (``point_mask``); a sample holds no
    identity across samples, so its points fill columns 0.. in track order and the rest is
    padding (masked, zero). Returns (packed samples, track int64[S, N'] behind each column,
    -1 for padding).
    """
    mask = samples["point_mask"]
    S, N = mask.shape
    count = mask.sum(1)
    width = max(int(count.max()) if S else 0, 1)
    # The known points first, each sample's in their track order (a stable sort).
    track = np.argsort(~mask, axis=1, kind="stable")[:, :width]  # [S, N']
    keep = np.arange(width)[None, :] < count[:, None]  # [S, N']
    packed = dict(samples)
    for key in trace_dataset.PER_POINT_KEYS:
        if key not in samples:
            continue
        x = samples[key]
        idx = track.reshape(S, width, *([1] * (x.ndim - 2)))
        y = np.take_along_axis(x, idx, axis=1)
        k = keep.reshape(S, width, *([1] * (x.ndim - 2)))
        fill = -1 if key == "group_id" else 0
        packed[key] = np.where(k, y, np.asarray(fill, dtype=x.dtype)).astype(x.dtype)
    return packed, np.where(keep, track, -1).astype(np.int64)


# ---------------------------------------------------------------------------
# One episode


def _camera_axes_world(ep: RGBDEpisode) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(right, forward, up) unit vectors in the world, from the first camera pose."""
    R = ep.T_world_cam[0, :3, :3].astype(np.float64)
    right, down, forward = R[:, 0], R[:, 1], R[:, 2]
    up = ep.up_world if ep.up_world is not None else -down
    up = up / np.linalg.norm(up)
    # Horizontal directions relative to the viewer, with "up" taken out.
    right = right - np.dot(right, up) * up
    forward = forward - np.dot(forward, up) * up
    return right / np.linalg.norm(right), forward / max(np.linalg.norm(forward), 1e-9), up


def track_keypoints(ep: RGBDEpisode, config: ExtractConfig, tracker: Tracker) -> Tracks:
    """2D tracks of keypoints picked from pixels (``Tracks.query_frame`` says where each starts).

    ``config.num_points`` are picked in frame 0; with re-seeding, every
    ``config.reseed_every`` frames the points lost since are replaced by new ones picked
    away from the live tracks, so the episode stays covered as the arm occludes or turns
    what was tracked. Re-seeded tracks start at their frame and are not visible before it.
    """
    F = ep.num_frames
    saliency = motion_saliency(to_gray(ep.rgb), ep.depth_m)
    min_lost = max(1, int(round(config.reseed_min_lost * config.num_points)))

    def seed(t: int, alive_uv_px: np.ndarray) -> np.ndarray:
        missing = config.num_points - len(alive_uv_px)
        # A track needs a few frames ahead of it to give a sample a future.
        if t > 0 and (missing < min_lost or F - t < 4):
            return np.zeros((0, 2), np.float32)
        uv, _ = select_keypoints(
            ep.rgb,
            ep.depth_m,
            missing,
            query_frame=t,
            moving_share=config.moving_share,
            saliency=saliency,
            exclude_uv_px=alive_uv_px,
        )
        return uv

    if config.reseed_every > 0:
        return track_with_reseeding(tracker, ep.rgb, seed, config.reseed_every)
    query_uv = seed(0, np.zeros((0, 2), np.float32))
    tracks = tracker.track(ep.rgb, query_uv, query_frame=0)
    return Tracks(tracks.uv_px, tracks.visible, np.zeros(len(query_uv), np.int64))


def extract_episode(
    ep: RGBDEpisode,
    config: ExtractConfig | None = None,
    tracker: Tracker | None = None,
    captioner: Any = None,
) -> EpisodeTraces:
    """Traces of one RGB-D episode (raises ExtractError naming it on bad input)."""
    config = config or ExtractConfig()
    start_time = time.perf_counter()
    ep.validate()
    tracker = tracker or make_tracker(config.tracker, **config.tracker_kwargs)
    captioner = captioner or make_captioner(config.captioner)

    tracks = track_keypoints(ep, config, tracker)
    query_frame = tracks.query_frame
    if len(query_frame) == 0:
        raise ExtractError(ep.id, "no trackable pixels with depth in the first frame")
    query_uv = tracks.uv_px[query_frame, np.arange(len(query_frame))]
    xyz_world, valid = lift_tracks(
        tracks.uv_px, tracks.visible, ep.depth_m, ep.intrinsics, ep.T_world_cam
    )
    moving = is_moving(
        np.swapaxes(np.nan_to_num(xyz_world), 0, 1), valid.T, config.moving_threshold_m
    )
    group_id = rigid_groups(xyz_world, valid, moving, config.rigid_tolerance_m)

    activity = motion_activity(xyz_world, valid, moving)
    bounds = segment_episode(activity, ep.gripper_closed)
    right, forward, up = _camera_axes_world(ep)
    segments = []
    for a, b in bounds:
        m = moving & valid[a] & valid[b - 1]
        disp = (xyz_world[b - 1, m] - xyz_world[a, m]).mean(0) if m.any() else np.zeros(3)
        path = float(activity[a : b - 1].sum()) if b - 1 > a else 0.0
        g = ep.gripper_closed
        segments.append(
            Segment(
                start=a,
                end=b,
                # The state before the segment, so a segment that starts with a grasp says so.
                gripper_start=None if g is None else float(g[max(a - 1, 0)]),
                gripper_end=None if g is None else float(g[b - 1]),
                displacement_world=disp,
                path_m=path,
                right_world=right,
                forward_world=forward,
                up_world=up,
                rgb_start=ep.rgb[a],
                rgb_end=ep.rgb[b - 1],
            )
        )
    captions = [str(c) for c in captioner(ep.instruction, segments)]
    if len(captions) != len(segments):
        raise ExtractError(
            ep.id, f"captioner gave {len(captions)} captions for {len(segments)} segments"
        )

    gt = None
    if ep.sim is not None:
        # Each point's truth: the body under it in its query frame, moved rigidly from there.
        gt = np.zeros_like(xyz_world)
        for f in np.unique(query_frame):
            n = np.flatnonzero(query_frame == f)
            x0 = np.nan_to_num(np.where(valid[f, n][:, None], xyz_world[f, n], np.nan))
            seg = None if ep.sim.segmentation is None else ep.sim.segmentation[f]
            body = attach_to_bodies(query_uv[n], x0, ep.sim.body_pose[f], seg)
            gt[:, n] = rigid_body_tracks(x0, body, ep.sim.body_pose, query_frame=int(f))
    traces = EpisodeTraces(
        episode=ep,
        query_uv_px=query_uv,
        query_frame=query_frame,
        uv_px=tracks.uv_px,
        visible=tracks.visible,
        xyz_world=xyz_world,
        valid=valid,
        moving=moving,
        group_id=group_id,
        segments=segments,
        captions=captions,
        samples={},
        sample_track=np.zeros((0, 0), np.int64),
        gt_xyz_world=gt,
        num_points=config.num_points,
    )
    traces.samples, traces.sample_track = cut_samples(traces, config)
    traces.seconds = time.perf_counter() - start_time
    return traces


def cut_samples(
    traces: EpisodeTraces, config: ExtractConfig
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """An episode's packed samples (and the track behind each column) under ``config``'s
    target options, from its tracks; the simulator's truth is added where the episode has it.
    Cheap next to tracking, so several target definitions can be cut from one extraction."""
    ep = traces.episode
    truth = None
    if ep.sim is not None:
        truth = {
            "body_pose": ep.sim.body_pose,
            "uv_px": traces.uv_px,
            "body_part": body_parts(ep.sim.body_names, ep.sim.body_pose.shape[1]),
        }
        if ep.sim.segmentation is not None:
            truth["segmentation"] = ep.sim.segmentation
    samples = build_samples(
        ep,
        traces.xyz_world,
        traces.valid,
        traces.moving,
        traces.group_id,
        traces.segments,
        config,
        truth,
    )
    return pack_samples(samples)


# ---------------------------------------------------------------------------
# Many episodes


def extract_to_disk(
    spec: dict[str, Any], episode_id: str, out_dir: str, config: dict[str, Any]
) -> dict[str, Any]:
    """Worker: open the source, extract one episode, write it. Returns a JSON-able result;
    errors come back as {"ok": False, "error": ...} naming the episode, never raised."""
    try:
        ep = open_source(spec).load(episode_id)
        traces = extract_episode(ep, ExtractConfig.from_dict(config))
        trace_dataset.write_episode(out_dir, episode_id, traces.arrays(), traces.strings())
        return {"id": episode_id, "ok": True, "meta": traces.meta(), "report": traces.report()}
    except Exception as e:  # noqa: BLE001 - one bad episode must not stop the others
        message = (
            str(e)
            if isinstance(e, ExtractError)
            else f"episode {episode_id}: {type(e).__name__}: {e}"
        )
        return {"id": episode_id, "ok": False, "error": message}


def _done_result(out_dir: Path, episode_id: str) -> dict[str, Any] | None:
    if not trace_dataset.episode_done(out_dir, episode_id):
        return None
    _, json_path = trace_dataset.episode_paths(out_dir, episode_id)
    strings = json.loads(json_path.read_text())
    if "meta" not in strings:
        return None
    return {
        "id": episode_id,
        "ok": True,
        "meta": strings["meta"],
        "report": strings.get("report", {}),
        "skipped": True,
    }


def _run_local(jobs: list[str], spec, out_dir, cfg, workers: int, bar) -> list[dict[str, Any]]:
    results = []
    if workers <= 1:
        for eid in jobs:
            results.append(extract_to_disk(spec, eid, str(out_dir), cfg))
            bar.update(1)
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: the parent may hold torch/OpenMP thread pools that a fork would break.
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(extract_to_disk, spec, eid, str(out_dir), cfg): eid for eid in jobs}
        for fut in as_completed(futures):
            try:
                results.append(fut.result())
            except Exception as e:  # noqa: BLE001 - a worker that died (out of memory, say)
                eid = futures[fut]
                results.append(
                    {"id": eid, "ok": False, "error": f"episode {eid}: worker died: {e!r}"}
                )
            bar.update(1)
    return results


def _run_ray(jobs: list[str], spec, out_dir, cfg, bar) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"{RAY_HINT} ({e})") from e
    if not ray.is_initialized():
        # RAY_ADDRESS joins a running cluster; without it Ray starts a local one. Across
        # machines, the source and out_dir must be on a filesystem every node sees.
        ray.init(
            address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False
        )
    task = ray.remote(num_cpus=1)(extract_to_disk)
    pending = [task.remote(spec, eid, str(out_dir), cfg) for eid in jobs]
    results = []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        results.extend(ray.get(ready))
        bar.update(len(ready))
    return results


def run_extract(
    source: Any,
    out_dir: str | Path,
    config: ExtractConfig | None = None,
    workers: int | None = None,
    use_ray: bool = False,
    episode_ids: list[str] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract every episode of ``source`` (a source object, its spec, or a path) into
    ``out_dir``, then write ``meta.json``. Returns the dataset report, whose "failed"
    lists the episodes that could not be extracted and why."""
    from tqdm.auto import tqdm

    config = config or ExtractConfig()
    src = open_source(source) if isinstance(source, (str, Path, dict)) else source
    spec = src.spec
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = list(episode_ids) if episode_ids is not None else src.episode_ids()
    if not ids:
        raise ValueError(f"{spec['root']}: no episodes found")
    results, jobs = [], []
    for eid in ids:
        done = _done_result(out_dir, eid) if resume else None
        (results.append(done) if done else jobs.append(eid))
    workers = workers if workers is not None else max(1, min(len(jobs), (os.cpu_count() or 2) - 1))
    start = time.perf_counter()
    with tqdm(
        total=len(ids), initial=len(results), desc="extract", unit="ep", disable=not progress
    ) as bar:
        if jobs and use_ray:
            results += _run_ray(jobs, spec, out_dir, config.to_dict(), bar)
        elif jobs:
            results += _run_local(jobs, spec, out_dir, config.to_dict(), workers, bar)
    seconds = time.perf_counter() - start

    ok = sorted((r for r in results if r["ok"]), key=lambda r: r["id"])
    failed = sorted(
        ({"id": r["id"], "error": r["error"]} for r in results if not r["ok"]),
        key=lambda r: r["id"],
    )
    new_frames = sum(r["report"]["frames"] for r in ok if not r.get("skipped"))

    def mean(key: str) -> float:
        vals = [r["report"][key] for r in ok if key in r["report"]]
        return float(np.mean(vals)) if vals else 0.0

    report = {
        "episodes": len(ok),
        "failed": failed,
        "frames": sum(r["report"]["frames"] for r in ok),
        "samples": sum(r["report"]["samples"] for r in ok),
        "points": sum(r["report"]["points"] for r in ok),
        "moving_points": sum(r["report"]["moving_points"] for r in ok),
        "coverage": mean("coverage"),
        "share_valid": mean("share_valid"),
        "share_future_valid": mean("share_future_valid"),
        "frames_per_s": new_frames / seconds if new_frames and seconds > 0 else None,
        "config": config.to_dict(),
    }
    trace_dataset.write_meta(
        out_dir,
        [r["meta"] for r in ok],
        source=json.dumps(spec),
        report=report,
        history_steps=config.history_steps,
        horizon=config.horizon,
    )
    return report
