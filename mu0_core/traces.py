"""Trace utilities for building datasets: future windows, temporal smoothing, arc-length
re-timing and moving/static flags.

Our models forecast a fixed time window (H future frames at a stride); the reference's
arc-length re-timing is kept as an option. numpy only: this runs in data preparation.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def retime_by_arc_length(
    points: Any,
    valid: Any,
    num_out: int,
    min_total_length: float = 1e-6,
    arc_points: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a trace to ``num_out`` samples equally spaced in arc length.

    points: [T, D]; valid: bool[T]. Only the valid prefix (up to the first invalid step)
    is used: what follows a gap is not trusted to belong to the same motion.
    arc_points: optional [T, M] in which to measure arc length (e.g. metric xyz while
    resampling uvz, whose axes have different units); defaults to ``points``.

    Returns (points_out [num_out, D] float64, valid_out bool[num_out]):
    - a path shorter than ``min_total_length`` (a point that does not move) stays put:
      every sample equals the start and is valid;
    - a trace whose first step is invalid has nothing to resample: all samples are the
      first input point and invalid.
    """
    points = np.asarray(points, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    if points.ndim != 2 or valid.shape != points.shape[:1]:
        raise ValueError(
            f"points must be [T, D] and valid [T], got {points.shape} and {valid.shape}"
        )
    arc = points if arc_points is None else np.asarray(arc_points, dtype=np.float64)
    if arc.ndim != 2 or arc.shape[0] != points.shape[0]:
        raise ValueError(f"arc_points must be [T, M] with T = {points.shape[0]}, got {arc.shape}")
    out, valid_out = retime_by_arc_length_batch(
        points[None], valid[None], num_out, min_total_length, arc[None]
    )
    return out[0], valid_out[0]


def retime_by_arc_length_batch(
    points: Any,
    valid: Any,
    num_out: int,
    min_total_length: float = 1e-6,
    arc_points: Any = None,
    keep_length: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``retime_by_arc_length`` for B traces at once, with the same rules.

    points: [B, T, D]; valid: bool[B, T]; arc_points: optional [B, T, M].
    keep_length: resample a valid prefix of n steps into the first n outputs (the rest
    invalid) instead of stretching it over all ``num_out`` (a track lost early is then not
    passed off as a whole future). Needs T == num_out.
    Returns (points_out [B, num_out, D] float64, valid_out bool[B, num_out]).
    """
    points = np.asarray(points, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    if points.ndim != 3 or valid.shape != points.shape[:2]:
        raise ValueError(
            f"points must be [B, T, D] and valid [B, T], got {points.shape} and {valid.shape}"
        )
    if num_out < 2:
        raise ValueError(f"num_out must be >= 2, got {num_out}")
    arc = points if arc_points is None else np.asarray(arc_points, dtype=np.float64)
    if arc.ndim != 3 or arc.shape[:2] != points.shape[:2]:
        raise ValueError(
            f"arc_points must be [B, T, M] with B, T = {points.shape[:2]}, got {arc.shape}"
        )
    B, T, _ = points.shape
    if keep_length and T != num_out:
        raise ValueError(f"keep_length needs T == num_out, got T = {T}, num_out = {num_out}")
    out = np.repeat(points[:, :1], num_out, axis=1)
    valid_out = np.zeros((B, num_out), bool)
    if B == 0 or T == 0:
        return out, valid_out

    invalid = ~valid
    n = np.where(invalid.any(1), invalid.argmax(1), T)  # [B] valid prefix lengths
    steps = np.arange(T)
    prefix = steps[None, :] < n[:, None]  # [B, T]
    if (
        not (np.isfinite(points).all(-1) | ~prefix).all()
        or not (np.isfinite(arc).all(-1) | ~prefix).all()
    ):
        raise ValueError("non-finite values inside the valid prefix; mark those steps invalid")
    arc = np.where(prefix[..., None], arc, 0.0)
    seg = np.linalg.norm(np.diff(arc, axis=1), axis=-1)  # [B, T - 1]
    seg = np.where(prefix[:, 1:], seg, 0.0)
    s = np.concatenate([np.zeros((B, 1)), np.cumsum(seg, axis=1)], axis=1)  # [B, T]
    rows = np.arange(B)
    total = s[rows, np.maximum(n - 1, 0)]
    if keep_length:
        valid_out = np.arange(num_out)[None, :] < n[:, None]
    else:
        valid_out[n > 0] = True
    moves = (n > 1) & (total >= min_total_length)
    if not moves.any():
        return out, valid_out

    b = np.flatnonzero(moves)
    sb, segb, nb, pts = s[b], seg[b], n[b], points[b]
    if keep_length:  # output k at arc fraction k / (n - 1), for k < n
        frac_out = np.minimum(np.arange(num_out)[None, :] / (nb[:, None] - 1.0), 1.0)
    else:
        frac_out = np.linspace(0.0, 1.0, num_out)[None, :]
    target = frac_out * total[b, None]  # [b, K]
    # searchsorted(side="right") - 1 within each valid prefix, as the one-trace version.
    le = (sb[:, None, :] <= target[:, :, None]) & prefix[b][:, None, :]  # [b, K, T]
    i = np.clip(le.sum(-1) - 1, 0, nb[:, None] - 2)  # [b, K]
    seg_i = np.take_along_axis(segb, i, 1)
    frac = np.zeros_like(target)
    np.divide(target - np.take_along_axis(sb, i, 1), seg_i, out=frac, where=seg_i > 0)
    p0 = np.take_along_axis(pts, i[..., None], 1)
    p1 = np.take_along_axis(pts, (i + 1)[..., None], 1)
    res = p0 + np.clip(frac, 0.0, 1.0)[..., None] * (p1 - p0)
    last = nb - 1 if keep_length else np.full(len(b), num_out - 1)
    res[np.arange(len(b)), last] = pts[np.arange(len(b)), nb - 1]  # land exactly on the end
    out[b] = res
    return out, valid_out


def future_frames(frames: Any, num_frames: int, horizon: int, stride: int = 1):
    """The fixed future window of each sample frame: step k is frame t + k * stride.

    frames: int[S] -> (index int64[S, horizon] clipped into the episode, inside bool[S, horizon]
    False where the window runs past the episode's last frame).
    """
    if stride < 1:
        raise ValueError(f"frame stride must be >= 1, got {stride}")
    idx = np.asarray(frames, np.int64)[:, None] + stride * np.arange(horizon)[None, :]
    return np.minimum(idx, num_frames - 1), idx < num_frames


def smooth_tracks(xyz: Any, valid: Any, frames: int) -> np.ndarray:
    """Centred moving average of tracks over ``frames`` frames (odd), within runs of valid steps.

    xyz: [F, N, D] (any value where invalid); valid: bool[F, N]. Each valid step becomes the
    mean of the window of up to ``frames`` steps centred on it, shrunk symmetrically near the
    ends of its valid run (a one-sided window would drag a moving point's ends back along its
    path); invalid steps are left as they are. Depth lifted from a camera jitters from frame
    to frame, and both the arc length of a path and its displacement pick that jitter up.
    """
    xyz = np.asarray(xyz, np.float64)
    valid = np.asarray(valid, bool)
    out = xyz.copy()
    k = frames // 2
    if k < 1 or xyz.size == 0:
        return out
    F = len(xyz)
    steps = np.arange(F)[:, None]
    # Distance of each step to the nearest invalid step (or the episode's end) on each side.
    last_bad = np.maximum.accumulate(np.where(~valid, steps, -1), axis=0)
    next_bad = np.flip(
        np.minimum.accumulate(np.flip(np.where(~valid, steps, F), axis=0), axis=0), axis=0
    )
    half = np.minimum(np.minimum(steps - last_bad - 1, next_bad - steps - 1), k)  # [F, N]
    x = np.where(valid[..., None], np.nan_to_num(xyz), 0.0)
    c = np.concatenate([np.zeros((1, *x.shape[1:])), np.cumsum(x, axis=0)])  # [F + 1, N, D]
    for h in range(1, k + 1):
        lo = np.clip(np.arange(F) - h, 0, F)
        hi = np.clip(np.arange(F) + h + 1, 0, F)
        mean = (c[hi] - c[lo]) / (2 * h + 1)
        use = valid & (half == h)
        out[use] = mean[use]
    return out


def path_length(points: Any, valid: Any) -> np.ndarray:
    """points [..., T, D], valid [..., T] -> [...] summed length of the steps whose two ends are valid."""
    points = np.asarray(points, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != points.shape[:-1]:
        raise ValueError(f"valid must be [..., T] = {points.shape[:-1]}, got {valid.shape}")
    step = np.linalg.norm(np.diff(points, axis=-2), axis=-1)  # [..., T - 1]
    both = valid[..., 1:] & valid[..., :-1]
    return np.where(both, step, 0.0).sum(-1)


def is_moving(points: Any, valid: Any, threshold: float) -> np.ndarray:
    """bool[...]: True where a point's valid path (points [..., T, D]) is longer than ``threshold``.

    ``threshold`` is in the units of ``points`` (metres for xyz). Path length, not net
    displacement, so a point that leaves and comes back still counts as moving.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    return path_length(points, valid) > threshold
