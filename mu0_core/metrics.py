"""Trace metrics: ADE/FDE in uv, pixels, depth and metric 3D; min-over-K; DTW; Fréchet; smoothness.

Inputs follow ``TraceBatch``: traces_uvz float[B, N, H, 3] (normalised uv, depth m),
valid bool[B, N, H], an optional point_mask bool[B, N], intrinsics float[B, 4]
(fx, fy, cx, cy) and image_size [B, 2] (width, height) in pixels. Invalid steps and
masked points never enter a number. Averages are over *points*: each point's error is
averaged over its own valid steps first, so long traces do not outweigh short ones.
Values without valid points come out as NaN rather than a misleading 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mu0_core.geometry import uvz_to_xyz

# ---------------------------------------------------------------------------
# Shared plumbing


def _valid_mask(valid: Tensor, point_mask: Tensor | None) -> Tensor:
    """bool[B, N, H]: steps that count, with masked points switched off."""
    valid = torch.as_tensor(valid).bool()
    if point_mask is not None:
        valid = valid & torch.as_tensor(point_mask, device=valid.device).bool()[..., None]
    return valid


def _check_traces(pred: Tensor, gt: Tensor, valid: Tensor) -> None:
    if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[-1] != 3:
        raise ValueError(
            f"pred and gt must both be [B, N, H, 3], got {tuple(pred.shape)} and {tuple(gt.shape)}"
        )
    if valid.shape != pred.shape[:-1]:
        raise ValueError(
            f"valid must be [B, N, H] = {tuple(pred.shape[:-1])}, got {tuple(valid.shape)}"
        )


def _step_errors(
    pred: Tensor, gt: Tensor, intrinsics: Tensor, image_size: Tensor
) -> dict[str, Tensor]:
    """Per-step errors, each float[B, N, H]: uv (normalised), px, depth_m and 3d_m."""
    B = pred.shape[0]
    size = torch.as_tensor(image_size, dtype=pred.dtype, device=pred.device).reshape(B, 1, 1, 2)
    d = pred - gt  # [B, N, H, 3]
    # Normalised uv spans 2 units over W (resp. H) pixels.
    d_px = d[..., :2] * size / 2
    xyz_pred = uvz_to_xyz(pred, intrinsics, image_size)  # [B, N, H, 3] camera frame, metres
    xyz_gt = uvz_to_xyz(gt, intrinsics, image_size)
    return {
        "uv": torch.linalg.vector_norm(d[..., :2], dim=-1),
        "px": torch.linalg.vector_norm(d_px, dim=-1),
        "depth_m": d[..., 2].abs(),
        "3d_m": torch.linalg.vector_norm(xyz_pred - xyz_gt, dim=-1),
    }


def _per_point_ade_fde(err: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """err, valid [..., H] -> (ade [...], fde [...], has_valid bool[...])."""
    count = valid.sum(-1)
    has_valid = count > 0
    ade = torch.where(valid, err, torch.zeros_like(err)).sum(-1) / count.clamp(min=1)
    steps = torch.arange(err.shape[-1], device=err.device)
    last = torch.where(valid, steps, -1).amax(-1).clamp(min=0)  # last valid step per point
    fde = torch.gather(err, -1, last[..., None])[..., 0]
    return ade, fde, has_valid


def _mean_over(values: Tensor, keep: Tensor) -> float:
    if not bool(keep.any()):
        return float("nan")
    return float(values[keep].double().mean())


# ---------------------------------------------------------------------------
# ADE / FDE


@torch.no_grad()
def trace_metrics(
    pred: Tensor,
    gt: Tensor,
    valid: Tensor,
    intrinsics: Tensor,
    image_size: Tensor,
    horizons: tuple[int, ...] = (8, 16, 32),
    point_mask: Tensor | None = None,
) -> dict[str, float]:
    """ADE and FDE over the first h steps, for each h in ``horizons``.

    pred, gt: [B, N, H, 3] absolute uvz. FDE is taken at each point's last valid step
    within the horizon. Keys, for each h: ``ade_uv_h{h}``/``fde_uv_h{h}`` (normalised
    units), ``ade_px_h{h}``/``fde_px_h{h}`` (pixels of the original image),
    ``ade_depth_m_h{h}``/``fde_depth_m_h{h}`` (|dz|, m), ``ade3d_m_h{h}``/``fde3d_m_h{h}``
    (camera-frame Euclidean, m) and ``num_points_h{h}`` (points averaged over, for
    weighting means across batches).
    """
    pred, gt = torch.as_tensor(pred), torch.as_tensor(gt)
    valid = _valid_mask(valid, point_mask)
    _check_traces(pred, gt, valid)
    H = pred.shape[2]
    if not horizons or any(h < 1 or h > H for h in horizons):
        raise ValueError(f"horizons must lie in [1, {H}] (the traces' length), got {horizons}")
    errors = _step_errors(pred, gt, intrinsics, image_size)
    suffix = {"uv": "_uv", "px": "_px", "depth_m": "_depth_m", "3d_m": "3d_m"}  # ade3d_m_h32
    out: dict[str, float] = {}
    for h in horizons:
        valid_h = valid[..., :h]
        for key, err in errors.items():
            ade, fde, has_valid = _per_point_ade_fde(err[..., :h], valid_h)
            out[f"ade{suffix[key]}_h{h}"] = _mean_over(ade, has_valid)
            out[f"fde{suffix[key]}_h{h}"] = _mean_over(fde, has_valid)
        out[f"num_points_h{h}"] = float(valid_h.any(-1).sum())
    return out


@torch.no_grad()
def min_ade_k(
    pred_k: Tensor,
    gt: Tensor,
    valid: Tensor,
    intrinsics: Tensor,
    image_size: Tensor,
    point_mask: Tensor | None = None,
    horizon: int | None = None,
) -> float:
    """Best-of-K 3D ADE (m): pred_k [K, B, N, H, 3] samples, min over K per point, mean over points."""
    pred_k, gt = torch.as_tensor(pred_k), torch.as_tensor(gt)
    if pred_k.ndim != 5 or pred_k.shape[1:] != gt.shape:
        raise ValueError(
            f"pred_k must be [K, *gt.shape] = [K, {list(gt.shape)}], got {tuple(pred_k.shape)}"
        )
    valid = _valid_mask(valid, point_mask)
    _check_traces(pred_k[0], gt, valid)
    h = gt.shape[2] if horizon is None else horizon
    valid_h = valid[..., :h]
    per_sample = []
    for pred in pred_k:  # K is small; one pass per sample keeps memory at one batch
        err = _step_errors(pred, gt, intrinsics, image_size)["3d_m"][..., :h]
        ade, _, has_valid = _per_point_ade_fde(err, valid_h)
        per_sample.append(ade)
    best = torch.stack(per_sample).amin(0)  # [B, N]
    return _mean_over(best, has_valid)


# ---------------------------------------------------------------------------
# DTW and discrete Fréchet (numpy dynamic programmes, batched over pairs)


def _pairwise_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [P, T, D], b [P, S, D] -> Euclidean distances [P, T, S]."""
    return np.linalg.norm(a[:, :, None, :] - b[:, None, :, :], axis=-1)


def _alignment_dp(
    cost: np.ndarray, combine: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> np.ndarray:
    """Monotone-alignment DP over cost [P, T, S] -> table R [P, T + 1, S + 1].

    R[i, j] = combine(cost[i-1, j-1], min(R[i-1, j-1], R[i-1, j], R[i, j-1])), with a border
    of +inf and R[0, 0] = 0. Cells on one anti-diagonal (i + j = k) depend only on the two
    previous anti-diagonals, so each diagonal is one vectorised step over all P pairs.
    """
    P, T, S = cost.shape
    R = np.full((P, T + 1, S + 1), np.inf)
    R[:, 0, 0] = 0.0
    for k in range(2, T + S + 1):
        i = np.arange(max(1, k - S), min(T, k - 1) + 1)
        j = k - i
        best_prev = np.minimum(np.minimum(R[:, i - 1, j - 1], R[:, i - 1, j]), R[:, i, j - 1])
        R[:, i, j] = combine(cost[:, i - 1, j - 1], best_prev)
    return R


def _check_seq(x: Any, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty [T, D] sequence, got shape {x.shape}")
    return x


def dtw_distance(a: Any, b: Any) -> float:
    """Dynamic time warping between a [T, D] and b [S, D]: the sum of Euclidean distances
    along the cheapest monotone alignment (units of the inputs, not normalised by length)."""
    a, b = _check_seq(a, "a"), _check_seq(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must share D, got {a.shape[1]} and {b.shape[1]}")
    return float(_alignment_dp(_pairwise_dist(a[None], b[None]), np.add)[0, -1, -1])


def discrete_frechet(a: Any, b: Any) -> float:
    """Discrete Fréchet distance between a [T, D] and b [S, D]: the smallest achievable
    largest distance along a monotone alignment (units of the inputs)."""
    a, b = _check_seq(a, "a"), _check_seq(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must share D, got {a.shape[1]} and {b.shape[1]}")
    return float(_alignment_dp(_pairwise_dist(a[None], b[None]), np.maximum)[0, -1, -1])


def _packed_valid_xyz(
    pred: Tensor,
    gt: Tensor,
    valid: Tensor,
    intrinsics: Tensor,
    image_size: Tensor,
    point_mask: Tensor | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3D traces of the points with any valid step, valid steps moved to the front.

    Returns (pred_xyz [P, H, 3], gt_xyz [P, H, 3], lengths [P]); steps past lengths[p] are
    padding that the DP never reads for pair p.
    """
    pred, gt = torch.as_tensor(pred), torch.as_tensor(gt)
    valid = _valid_mask(valid, point_mask)
    _check_traces(pred, gt, valid)
    xyz_pred = (
        uvz_to_xyz(pred, intrinsics, image_size)
        .double()
        .cpu()
        .numpy()
        .reshape(-1, pred.shape[2], 3)
    )
    xyz_gt = (
        uvz_to_xyz(gt, intrinsics, image_size).double().cpu().numpy().reshape(-1, pred.shape[2], 3)
    )
    valid = valid.cpu().numpy().reshape(-1, pred.shape[2])  # [B * N, H]
    lengths = valid.sum(-1)
    keep = lengths > 0
    order = np.argsort(~valid[keep], axis=-1, kind="stable")  # valid steps first, in time order
    pack = lambda x: np.take_along_axis(x[keep], order[..., None], axis=1)  # noqa: E731
    return pack(xyz_pred), pack(xyz_gt), lengths[keep]


def _mean_alignment_3d(
    combine: Callable[[np.ndarray, np.ndarray], np.ndarray],
    pred: Tensor,
    gt: Tensor,
    valid: Tensor,
    intrinsics: Tensor,
    image_size: Tensor,
    point_mask: Tensor | None,
) -> float:
    a, b, lengths = _packed_valid_xyz(pred, gt, valid, intrinsics, image_size, point_mask)
    if len(lengths) == 0:
        return float("nan")
    R = _alignment_dp(_pairwise_dist(a, b), combine)  # [P, H + 1, H + 1]
    return float(R[np.arange(len(lengths)), lengths, lengths].mean())


@torch.no_grad()
def mean_dtw_3d(
    pred: Tensor,
    gt: Tensor,
    valid: Tensor,
    intrinsics: Tensor,
    image_size: Tensor,
    point_mask: Tensor | None = None,
) -> float:
    """Mean over points of the DTW distance (m) between predicted and true 3D traces.

    pred, gt [B, N, H, 3] uvz; each point is compared over its own valid steps only.
    """
    return _mean_alignment_3d(np.add, pred, gt, valid, intrinsics, image_size, point_mask)


@torch.no_grad()
def mean_frechet_3d(
    pred: Tensor,
    gt: Tensor,
    valid: Tensor,
    intrinsics: Tensor,
    image_size: Tensor,
    point_mask: Tensor | None = None,
) -> float:
    """Mean over points of the discrete Fréchet distance (m) between predicted and true 3D traces."""
    return _mean_alignment_3d(np.maximum, pred, gt, valid, intrinsics, image_size, point_mask)


# ---------------------------------------------------------------------------
# Smoothness


@torch.no_grad()
def smoothness(traj: Any, valid: Any = None) -> dict[str, float]:
    """Finite-difference smoothness of traj [..., H, D] (lower is smoother).

    ``jerk``: mean norm of the third difference x[i+3] - 3x[i+2] + 3x[i+1] - x[i];
    ``accel``: mean norm of the second difference x[i+2] - 2x[i+1] + x[i].
    Units: those of traj per step^3 (jerk) and per step^2 (accel), with unit time step;
    divide by dt^3 (dt^2) for physical units. A difference counts only if all the
    samples it uses are valid (valid [..., H], default all). NaN when none does.
    """
    traj = torch.as_tensor(traj).double()
    if traj.ndim < 2:
        raise ValueError(f"traj must be [..., H, D], got {tuple(traj.shape)}")
    valid = (
        torch.ones(traj.shape[:-1], dtype=torch.bool)
        if valid is None
        else torch.as_tensor(valid).bool()
    )
    if valid.shape != traj.shape[:-1]:
        raise ValueError(
            f"valid must be [..., H] = {tuple(traj.shape[:-1])}, got {tuple(valid.shape)}"
        )
    out = {}
    for name, order in (("accel", 2), ("jerk", 3)):
        if traj.shape[-2] <= order:
            out[name] = float("nan")
            continue
        diff = torch.diff(traj, n=order, dim=-2)  # [..., H - order, D]
        ok = valid[..., : valid.shape[-1] - order]
        for shift in range(1, order + 1):
            ok = ok & valid[..., shift : valid.shape[-1] - order + shift]
        norms = torch.linalg.vector_norm(diff, dim=-1)
        out[name] = float(norms[ok].mean()) if bool(ok.any()) else float("nan")
    return out
