"""Hand-eye calibration from ChArUco views and robot poses (OpenCV, then a joint refinement).

Two set-ups, one solver:

- eye-to-hand: the camera is fixed, the board rides on the gripper. Unknowns
  ``T_base_cam`` and ``T_eef_board``; every view i satisfies
  ``T_base_cam @ T_cam_board[i] == T_base_eef[i] @ T_eef_board``.
- eye-in-hand: the camera rides on the wrist, the board is fixed. Unknowns ``T_eef_cam``
  and ``T_base_board``; ``T_base_eef[i] @ T_eef_cam @ T_cam_board[i] == T_base_board``.

Steps: `cv2.calibrateHandEye` with each of its methods gives a starting point (the one
whose chain reprojects best wins); a Levenberg–Marquardt refinement then minimises the
reprojection error of every detected corner through the whole chain (robot pose, the two
unknowns, the camera matrix). Views that disagree with the rest (a robot pose read at the
wrong moment, a misdetection) are dropped and the solve repeated; the result reports
which views were used, why others were not, and the residuals in pixels, mm and degrees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from calibration.board import BoardView, CharucoBoardSpec, import_cv2
from calibration.transforms import (
    inv_T,
    make_T,
    matrix_to_rotvec,
    mean_rotation,
    rotation_angle_deg,
    rotvec_to_matrix,
)

Kind = Literal["eye_to_hand", "eye_in_hand"]
KINDS: tuple[str, ...] = ("eye_to_hand", "eye_in_hand")
METHODS: tuple[str, ...] = ("TSAI", "PARK", "HORAUD", "ANDREFF", "DANIILIDIS")


@dataclass(frozen=True)
class HandEyeLimits:
    min_views: int = 6
    # A view whose chain RMS exceeds max(factor × median, floor) is an outlier.
    outlier_factor: float = 3.0
    outlier_floor_px: float = 1.0
    # Rotations about one axis only leave the hand-eye translation along it unobservable.
    min_rotation_spread_deg: float = 15.0


@dataclass(frozen=True)
class HandEyeResult:
    """``T_ref_cam`` is ``T_base_cam`` (eye-to-hand) or ``T_eef_cam`` (eye-in-hand);
    ``T_target`` the other unknown, ``T_eef_board`` or ``T_base_board``."""

    kind: str
    T_ref_cam: np.ndarray
    T_target: np.ndarray
    method: str
    views_used: list[int]
    views_rejected: dict[int, str]
    reprojection_rms_px: float  # every used corner through the whole chain
    pnp_rms_px: float  # mean of the single-view board poses' RMS
    residual_trans_mm: float  # median over used views, board pose predicted vs measured
    residual_rot_deg: float
    rotation_spread_deg: float  # largest angle between two used gripper orientations
    per_method: dict[str, dict[str, float]] = field(default_factory=dict)
    per_view: list[dict[str, Any]] = field(default_factory=list)

    def quality(self) -> dict[str, Any]:
        """The figures a calibration file records."""
        return {
            "method": self.method,
            "views_used": len(self.views_used),
            "views_rejected": {str(k): v for k, v in self.views_rejected.items()},
            "reprojection_rms_px": round(self.reprojection_rms_px, 4),
            "pnp_rms_px": round(self.pnp_rms_px, 4),
            "residual_trans_mm": round(self.residual_trans_mm, 3),
            "residual_rot_deg": round(self.residual_rot_deg, 4),
            "rotation_spread_deg": round(self.rotation_spread_deg, 2),
        }


class CalibrationError(RuntimeError):
    """Too few usable views, or views that do not constrain the solution."""


def calibrate_hand_eye(
    kind: Kind,
    T_base_eef: list[np.ndarray],
    views: list[BoardView],
    spec: CharucoBoardSpec,
    K: np.ndarray,
    dist: np.ndarray | None = None,
    limits: HandEyeLimits = HandEyeLimits(),
    refine: bool = True,
) -> HandEyeResult:
    """Solve a hand-eye calibration; one robot pose per view, same order.

    Views already rejected at detection keep their reason; the rest must number at least
    ``limits.min_views`` after outliers are removed, or CalibrationError says what to do.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if len(T_base_eef) != len(views):
        raise ValueError(f"{len(T_base_eef)} robot poses for {len(views)} views")
    K = np.asarray(K, dtype=np.float64)
    dist = np.zeros(5) if dist is None else np.asarray(dist, dtype=np.float64)
    rejected = {i: v.reject_reason for i, v in enumerate(views) if not v.ok}
    used = [i for i, v in enumerate(views) if v.ok]
    poses = [np.asarray(T, dtype=np.float64) for T in T_base_eef]
    corners = spec.corners_board()

    while True:
        if len(used) < limits.min_views:
            raise CalibrationError(
                f"{len(used)} usable views, need {limits.min_views}; rejected: "
                + "; ".join(f"view {i}: {r}" for i, r in sorted(rejected.items()))
            )
        spread = _rotation_spread_deg([poses[i] for i in used])
        if spread < limits.min_rotation_spread_deg:
            raise CalibrationError(
                f"the gripper turned through only {spread:.1f}° across the views "
                f"(need {limits.min_rotation_spread_deg:.0f}°): tilt and turn the wrist more"
            )
        per_method, best = {}, None
        for method in METHODS:
            try:
                X, Y = _opencv_solve(
                    kind, [poses[i] for i in used], [views[i] for i in used], method
                )
            except Exception as e:  # noqa: BLE001 - a method can fail on degenerate data
                per_method[method] = {"error": str(e)}
                continue
            rms = _chain_rms(kind, X, Y, poses, views, used, corners, K, dist)
            per_method[method] = {"reprojection_rms_px": rms}
            if best is None or rms < best[0]:
                best = (rms, method, X, Y)
        if best is None:
            raise CalibrationError(f"every OpenCV hand-eye method failed: {per_method}")
        _, method, X, Y = best
        if refine:
            X, Y = _refine(kind, X, Y, poses, views, used, corners, K, dist)
            method += "+LM"
        per_view_rms = {
            i: _chain_rms(kind, X, Y, poses, views, [i], corners, K, dist) for i in used
        }
        threshold = max(
            limits.outlier_factor * float(np.median(list(per_view_rms.values()))),
            limits.outlier_floor_px,
        )
        worst = max(used, key=lambda i: per_view_rms[i])
        if per_view_rms[worst] <= threshold:
            break
        # Drop the worst view only, then re-solve: one bad view inflates all residuals.
        rejected[worst] = (
            f"inconsistent with the other views: {per_view_rms[worst]:.2f} px through the "
            f"calibrated chain (threshold {threshold:.2f} px)"
        )
        used = [i for i in used if i != worst]

    per_view = []
    trans_mm, rot_deg = [], []
    for i in used:
        T_pred = _predicted_T_cam_board(kind, X, Y, poses[i])
        dt = float(np.linalg.norm(T_pred[:3, 3] - views[i].T_cam_board[:3, 3]) * 1e3)
        dr = rotation_angle_deg(T_pred[:3, :3] @ views[i].T_cam_board[:3, :3].T)
        trans_mm.append(dt)
        rot_deg.append(dr)
        per_view.append(
            {
                "view": i,
                "corners": len(views[i].ids),
                "pnp_rms_px": views[i].reprojection_rms_px,
                "chain_rms_px": per_view_rms[i],
                "residual_trans_mm": dt,
                "residual_rot_deg": dr,
            }
        )
    return HandEyeResult(
        kind=kind,
        T_ref_cam=X,
        T_target=Y,
        method=method,
        views_used=used,
        views_rejected=dict(sorted(rejected.items())),
        reprojection_rms_px=_chain_rms(kind, X, Y, poses, views, used, corners, K, dist),
        pnp_rms_px=float(np.mean([views[i].reprojection_rms_px for i in used])),
        residual_trans_mm=float(np.median(trans_mm)),
        residual_rot_deg=float(np.median(rot_deg)),
        rotation_spread_deg=spread,
        per_method=per_method,
        per_view=per_view,
    )


# --------------------------------------------------------------------------- internals


def _predicted_T_cam_board(kind: str, X: np.ndarray, Y: np.ndarray, T_base_eef: np.ndarray):
    """The board pose in the camera that the unknowns X, Y predict for one robot pose."""
    if kind == "eye_to_hand":  # X = T_base_cam, Y = T_eef_board
        return inv_T(X) @ T_base_eef @ Y
    return inv_T(X) @ inv_T(T_base_eef) @ Y  # X = T_eef_cam, Y = T_base_board


def _opencv_solve(
    kind: str, poses: list[np.ndarray], views: list[BoardView], method: str
) -> tuple[np.ndarray, np.ndarray]:
    cv2 = import_cv2()
    # calibrateHandEye solves the eye-in-hand form A_i X B_i = const with A_i the gripper
    # pose in the base; for eye-to-hand, feeding the base pose in the gripper instead makes
    # X the camera pose in the base (the board then rides on the "base").
    A = poses if kind == "eye_in_hand" else [inv_T(T) for T in poses]
    B = [v.T_cam_board for v in views]
    R, t = cv2.calibrateHandEye(
        [a[:3, :3] for a in A],
        [a[:3, 3] for a in A],
        [b[:3, :3] for b in B],
        [b[:3, 3] for b in B],
        method=getattr(cv2, f"CALIB_HAND_EYE_{method}"),
    )
    if R is None or not np.all(np.isfinite(R)) or not np.all(np.isfinite(t)):
        raise RuntimeError("no solution")
    X = make_T(R, np.asarray(t).reshape(3))
    # The other unknown: the average of what each view implies for it.
    Ys = [a @ X @ b for a, b in zip(A, B)]
    Y = make_T(mean_rotation(np.stack([y[:3, :3] for y in Ys])), np.mean([y[:3, 3] for y in Ys], 0))
    return X, Y


def _residuals(
    kind: str,
    X: np.ndarray,
    Y: np.ndarray,
    poses: list[np.ndarray],
    views: list[BoardView],
    used: list[int],
    corners: np.ndarray,
    K: np.ndarray,
    dist: np.ndarray,
) -> np.ndarray:
    cv2 = import_cv2()
    out = []
    for i in used:
        T = _predicted_T_cam_board(kind, X, Y, poses[i])
        obj = corners[views[i].ids]
        rvec, _ = cv2.Rodrigues(T[:3, :3])
        uv, _ = cv2.projectPoints(obj, rvec, T[:3, 3], K, dist)
        out.append((uv.reshape(-1, 2) - views[i].corners_px).ravel())
    return np.concatenate(out)


def _chain_rms(kind, X, Y, poses, views, used, corners, K, dist) -> float:
    r = _residuals(kind, X, Y, poses, views, used, corners, K, dist).reshape(-1, 2)
    return float(np.sqrt(np.mean(np.sum(r**2, axis=1))))


def _params_to_T(p: np.ndarray) -> np.ndarray:
    return make_T(rotvec_to_matrix(p[:3]), p[3:6])


def _perturb(T: np.ndarray, d: np.ndarray) -> np.ndarray:
    """T with a small rotation (left-multiplied, rotvec d[:3]) and translation d[3:] added."""
    return make_T(rotvec_to_matrix(d[:3]) @ T[:3, :3], T[:3, 3] + d[3:6])


def _refine(
    kind, X, Y, poses, views, used, corners, K, dist, iterations: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """Levenberg–Marquardt on the 12 parameters of (X, Y), numeric Jacobian.

    Small (a dozen parameters, a few hundred residuals), so a hand-written loop is plainer
    than a dependency; parameters are increments applied on the left of the current
    estimates, which keeps rotations away from rotation-vector singularities.
    """

    def residuals(d: np.ndarray) -> np.ndarray:
        return _residuals(
            kind, _perturb(X, d[:6]), _perturb(Y, d[6:]), poses, views, used, corners, K, dist
        )

    lam = 1e-3
    r = residuals(np.zeros(12))
    cost = float(r @ r)
    eps = np.array([1e-6] * 3 + [1e-6] * 3 + [1e-6] * 3 + [1e-6] * 3)
    for _ in range(iterations):
        J = np.empty((r.size, 12))
        for k in range(12):
            d = np.zeros(12)
            d[k] = eps[k]
            J[:, k] = (residuals(d) - r) / eps[k]
        H, g = J.T @ J, J.T @ r
        improved = False
        for _ in range(10):
            step = -np.linalg.solve(H + lam * np.diag(np.diag(H) + 1e-12), g)
            X_new, Y_new = _perturb(X, step[:6]), _perturb(Y, step[6:])
            r_new = _residuals(kind, X_new, Y_new, poses, views, used, corners, K, dist)
            cost_new = float(r_new @ r_new)
            if cost_new < cost:
                X, Y, r = X_new, Y_new, r_new
                improved = cost - cost_new > 1e-10 * cost
                cost = cost_new
                lam = max(lam / 10, 1e-9)
                break
            lam *= 10
        if not improved:
            break
    return X, Y


def _rotation_spread_deg(poses: list[np.ndarray]) -> float:
    """The largest rotation angle between any two gripper orientations."""
    Rs = [T[:3, :3] for T in poses]
    best = 0.0
    for a in range(len(Rs)):
        for b in range(a + 1, len(Rs)):
            best = max(best, float(np.rad2deg(np.linalg.norm(matrix_to_rotvec(Rs[a].T @ Rs[b])))))
    return best
