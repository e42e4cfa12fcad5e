"""Which pixels to follow: motion saliency over the episode, corners, and feature clustering.

Pixels alone decide (no simulator masks). A point is worth tracking when something moves
there at some time in the episode (saliency from frame and depth differences) and when its
neighbourhood has texture that Lucas–Kanade can lock onto (Shi–Tomasi corners). Candidates
are clustered by position, depth and colour so that each moving part gets points, not only
the most textured one, and a share of static points keeps the scene's context.
"""

from __future__ import annotations

import numpy as np

from mu0_core.extract import import_cv2


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8[F, H, W, 3] or [H, W, 3] RGB -> uint8[F, H, W] or [H, W]."""
    w = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.asarray(rgb, np.float32) @ w + 0.5, 0, 255).astype(np.uint8)


def motion_saliency(
    gray: np.ndarray, depth_m: np.ndarray, depth_scale_m: float = 0.05
) -> np.ndarray:
    """float32[H, W] in [0, 1]: how much each pixel changes at any time in the episode.

    gray: uint8[F, H, W]; depth_m: float32[F, H, W] (0 = unknown). Intensity and depth
    differences between consecutive frames, accumulated as a mean and a max (a cube that is
    lifted once changes its pixels for a few frames only), then blurred a little so corners
    beside a moving edge count too.
    """
    cv2 = import_cv2()
    g = gray.astype(np.float32) / 255.0
    d_int = np.abs(np.diff(g, axis=0))  # [F - 1, H, W]
    known = (depth_m[1:] > 0) & (depth_m[:-1] > 0)
    d_depth = np.where(known, np.abs(np.diff(depth_m, axis=0)), 0.0) / depth_scale_m
    change = np.maximum(d_int * 4.0, np.minimum(d_depth, 1.0))  # both roughly in [0, 1]
    sal = 0.5 * change.mean(0) / max(float(change.mean(0).max()), 1e-6) + 0.5 * change.max(0)
    sal = cv2.GaussianBlur(sal.astype(np.float32), (0, 0), sigmaX=1.5)
    return (sal / max(float(sal.max()), 1e-6)).astype(np.float32)


def corner_candidates(gray0: np.ndarray, mask: np.ndarray, max_corners: int, min_distance: float):
    """(uv_px float32[M, 2], response float32[M]) Shi–Tomasi corners inside mask."""
    cv2 = import_cv2()
    pts = cv2.goodFeaturesToTrack(
        gray0,
        maxCorners=max_corners,
        qualityLevel=1e-3,
        minDistance=min_distance,
        mask=mask.astype(np.uint8) * 255,
        blockSize=3,
    )
    if pts is None:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
    uv = pts.reshape(-1, 2).astype(np.float32)
    eig = cv2.cornerMinEigenVal(gray0, blockSize=3)
    ui, vi = np.round(uv).astype(int).T
    return uv, eig[vi, ui].astype(np.float32)


def _cluster_round_robin(features: np.ndarray, score: np.ndarray, k: int, take: int) -> np.ndarray:
    """Indices of ``take`` items: cluster ``features`` into k groups (k-means), then pick the
    best-scored remaining item of each cluster in turn, so every cluster is represented."""
    cv2 = import_cv2()
    n = len(features)
    if take >= n:
        return np.arange(n)
    k = max(1, min(k, n))
    if k > 1:
        cv2.setRNGSeed(0)  # deterministic k-means: the same episode gives the same points
        criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 1e-3)
        _, labels, _ = cv2.kmeans(
            features.astype(np.float32), k, None, criteria, 2, cv2.KMEANS_PP_CENTERS
        )
        labels = labels.reshape(-1)
    else:
        labels = np.zeros(n, dtype=np.int32)
    queues = [list(np.flatnonzero(labels == c)[np.argsort(-score[labels == c])]) for c in range(k)]
    # Larger saliency first: clusters holding the best candidates are served first each round.
    order = sorted(range(k), key=lambda c: -score[queues[c][0]] if queues[c] else 0.0)
    chosen: list[int] = []
    while len(chosen) < take:
        for c in order:
            if queues[c] and len(chosen) < take:
                chosen.append(int(queues[c].pop(0)))
    return np.array(sorted(chosen), dtype=np.int64)


def select_keypoints(
    rgb: np.ndarray,
    depth_m: np.ndarray,
    num_points: int,
    query_frame: int = 0,
    moving_share: float = 0.75,
    saliency_threshold: float = 0.15,
    saliency: np.ndarray | None = None,
    exclude_uv_px: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``num_points`` query pixels in ``query_frame``.

    rgb: uint8[F, H, W, 3]; depth_m: float32[F, H, W]; saliency: float32[H, W] from
    ``motion_saliency`` (computed here when None); exclude_uv_px: float[M, 2] pixels
    already tracked in ``query_frame``, whose neighbourhoods are left out (re-seeding).
    Returns (uv_px float32[N, 2], saliency float32[N] at the chosen pixels);
    N <= num_points (fewer on a blank image or where everything is taken).
    """
    cv2 = import_cv2()
    H, W = rgb.shape[1:3]
    if saliency is None:
        saliency = motion_saliency(to_gray(rgb), depth_m)
    sal = saliency
    g0, d0 = to_gray(rgb[query_frame]), depth_m[query_frame]
    # Corners need a 2-pixel margin for LK's window and known depth to be lifted.
    mask = np.zeros((H, W), bool)
    mask[2:-2, 2:-2] = True
    mask &= np.isfinite(d0) & (d0 > 0)
    min_distance = max(1.0, min(H, W) / 64.0)
    if exclude_uv_px is not None and len(exclude_uv_px):
        taken = np.zeros((H, W), np.uint8)
        radius = int(round(2 * min_distance))
        for u, v in np.round(np.asarray(exclude_uv_px)).astype(int):
            cv2.circle(taken, (int(u), int(v)), radius, 1, -1)
        mask &= taken == 0
    if num_points <= 0 or not mask.any():
        return np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
    uv, response = corner_candidates(g0, mask, num_points * 12, min_distance)
    if len(uv) < num_points:
        # Textureless images: top the candidates up with a grid, so coverage does not collapse.
        step = max(2, int(np.sqrt(H * W / (4 * num_points))))
        gv, gu = np.mgrid[2 : H - 2 : step, 2 : W - 2 : step]
        grid = np.stack([gu.ravel(), gv.ravel()], 1).astype(np.float32)
        grid = grid[mask[grid[:, 1].astype(int), grid[:, 0].astype(int)]]
        uv = np.concatenate([uv, grid])
        response = np.concatenate([response, np.zeros(len(grid), np.float32)])
    if len(uv) == 0:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
    ui, vi = np.round(uv).astype(int).T
    s = sal[vi, ui]
    lab = cv2.cvtColor(rgb[query_frame], cv2.COLOR_RGB2LAB).astype(np.float32) / 255.0
    z = d0[vi, ui]
    features = np.concatenate(
        [uv / max(H, W), (z / max(float(np.median(z)), 1e-3))[:, None] * 0.5, lab[vi, ui] * 0.5], 1
    )
    texture = response / max(float(response.max()), 1e-9)
    salient = s >= saliency_threshold
    n_move = min(int(salient.sum()), int(round(moving_share * num_points)))
    n_static = min(int((~salient).sum()), num_points - n_move)
    n_move = min(int(salient.sum()), num_points - n_static)  # static candidates may run short
    picks = []
    for sel, n, score in ((salient, n_move, s * (0.2 + texture)), (~salient, n_static, texture)):
        idx = np.flatnonzero(sel)
        if n > 0:
            k = max(1, n // 4)
            picks.append(idx[_cluster_round_robin(features[idx], score[idx], k, n)])
    chosen = np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)
    return uv[chosen].astype(np.float32), s[chosen].astype(np.float32)
