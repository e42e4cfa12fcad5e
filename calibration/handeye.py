"""Hand-eye calibration from ChArUco views and robot poses (OpenCV, then a joint refinement).

Two set-ups, one solver:

- eye-to-hand: the camera is fixed, the board rides on the gripper. Unknowns
  ``T_base_cam`` and ``T_eef_board``; every view i satisfies
  ``T_base_cam @ T_cam_board[i] == T_base_eef[i] @ T_eef_board``.
- eye-in-hand: the camera rides on the wrist, the board is fixed. Unknowns ``T_eef_cam``
  and ``T_base_board``; ``T_base_eef[i] @ T_eef_cam @ T_cam_board[i] == T_base_board``.

Steps: the set of robot poses must turn the wrist about more than one axis (about one
axis only, the translation along it is not determined: refused, with the motion to add).
`cv2.calibrateHandEye` with each of its methods gives a starting point (the one whose
views agree best wins); a Levenberg–Marquardt refinement then minimises the reprojection
error of every detected corner through the whole chain (robot pose, the two unknowns, the
camera matrix), first with views weighted down by how far they disagree (so a few wrong
robot poses do not drag the fit towards themselves), then plainly on the views kept.

A view is dropped, one at a time and the solve repeated, when its residual through the
chain exceeds an absolute limit (pixels, scaled with the corner noise the detections
themselves show, and millimetres at the board) or is far above the other views'. The
result is refused when too few views are left, when the fit as a whole is worse than the
limits, or when leaving single views out moves the answer too far; otherwise its verdict
is "good", or "marginal" with the reasons. Every figure lands in `HandEyeResult.quality()`.
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
    pose_error,
    rotvec_to_matrix,
)

Kind = Literal["eye_to_hand", "eye_in_hand"]
KINDS: tuple[str, ...] = ("eye_to_hand", "eye_in_hand")
METHODS: tuple[str, ...] = ("TSAI", "PARK", "HORAUD", "ANDREFF", "DANIILIDIS")
VERDICTS: tuple[str, ...] = ("good", "marginal", "refused")


@dataclass(frozen=True)
class HandEyeLimits:
    """When views are dropped, and when a result is refused or only marginal.

    σ below is the corner noise this session's detections show: the median of the views'
    single-view (PnP) reprojection RMS. Millimetres "at the board" are a view's pixel
    residual times its board distance over the focal length.
    """

    min_views: int = 6
    # Rotations spanning less than this cannot fix the hand-eye rotation well.
    min_rotation_spread_deg: float = 15.0
    # Turns about one axis leave the translation along that axis unobservable (AX = XB);
    # how far the turns leave their dominant axis: refused below, marginal below warn.
    min_off_axis_deg: float = 2.0
    warn_off_axis_deg: float = 8.0
    # A view is dropped above any of: factor × the median view (relative), or the
    # absolute limits max(view_noise_factor × σ, view_floor_px) and max_view_mm.
    outlier_factor: float = 3.0
    outlier_floor_px: float = 1.0
    view_noise_factor: float = 6.0
    view_floor_px: float = 3.0
    max_view_mm: float = 4.0
    # Refused when more than this share of the usable views had to be dropped.
    max_dropped_fraction: float = 0.34
    # The whole chain (views kept): refused above max(chain_noise_factor × σ, floor) px
    # or max_chain_mm; marginal above good_chain_mm.
    chain_noise_factor: float = 4.0
    chain_floor_px: float = 2.0
    max_chain_mm: float = 4.0
    good_chain_mm: float = 2.0
    # Leave-one-out: the largest change of the answer when one view is left out.
    good_loo_mm: float = 2.0
    good_loo_deg: float = 0.2
    max_loo_mm: float = 5.0
    max_loo_deg: float = 0.5


@dataclass(frozen=True)
class AxisCoverage:
    """How the relative rotations between robot poses spread over axes.

    axis: unit vector, the axis most turns are about, in ``frame`` ("base" for
    eye-to-hand, "gripper" for eye-in-hand, where the hand-eye equations' rotations
    live); off_axis_deg: the largest turn away from it between two poses.
    """

    axis: np.ndarray
    frame: str
    off_axis_deg: float
    spread_deg: float

    def describe_axis(self) -> str:
        names = ("x", "y", "z")
        k = int(np.argmax(np.abs(self.axis)))
        if abs(self.axis[k]) > np.cos(np.deg2rad(15.0)):
            return f"the {self.frame}'s {names[k]} axis"
        return f"the {self.frame} axis {np.round(self.axis, 2).tolist()}"

    def motion_to_add(self) -> str:
        names = ("x", "y", "z")
        others = sorted(names[k] for k in np.argsort(np.abs(self.axis))[:2])
        return f"tilt the wrist about the {self.frame}'s {others[0]} or {others[1]} axis too"


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
    corner_noise_px: float = float("nan")  # σ: median single-view RMS
    chain_rms_mm: float = float("nan")  # the chain's pixel residual at the board, mm
    coverage: AxisCoverage | None = None
    loo_spread_mm: float = float("nan")  # largest change when one view is left out
    loo_spread_deg: float = float("nan")
    loo_worst_view: int | None = None
    verdict: str = "good"
    warnings: list[str] = field(default_factory=list)
    per_method: dict[str, dict[str, float]] = field(default_factory=dict)
    per_view: list[dict[str, Any]] = field(default_factory=list)

    def quality(self) -> dict[str, Any]:
        """The figures a calibration file records (see docs/deployment.md for good values)."""
        cov = self.coverage
        return {
            "verdict": self.verdict,
            "warnings": list(self.warnings),
            "method": self.method,
            "views_used": len(self.views_used),
            "views_used_ids": list(self.views_used),
            "views_rejected": {str(k): v for k, v in self.views_rejected.items()},
            "reprojection_rms_px": round(self.reprojection_rms_px, 4),
            "chain_rms_mm_at_board": round(self.chain_rms_mm, 3),
            "corner_noise_px": round(self.corner_noise_px, 4),
            "pnp_rms_px": round(self.pnp_rms_px, 4),
            "residual_trans_mm": round(self.residual_trans_mm, 3),
            "residual_rot_deg": round(self.residual_rot_deg, 4),
            "rotation_spread_deg": round(self.rotation_spread_deg, 2),
            "rotation_axis": None if cov is None else np.round(cov.axis, 3).tolist(),
            "rotation_axis_frame": None if cov is None else cov.frame,
            "rotation_off_axis_deg": None if cov is None else round(cov.off_axis_deg, 2),
            "leave_one_out_mm": round(self.loo_spread_mm, 3),
            "leave_one_out_deg": round(self.loo_spread_deg, 4),
            "leave_one_out_worst_view": self.loo_worst_view,
        }


class CalibrationError(RuntimeError):
    """Too few usable views, views that do not constrain the solution, or a fit that
    fails the limits: the calibration is refused, and the message says what to do."""


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

    Views already rejected at detection keep their reason. Raises CalibrationError (the
    verdict "refused") when the views cannot determine the answer or disagree beyond
    ``limits``; the message names the views and the motion or recapture that would help.
    ``refine=False`` keeps OpenCV's answer (no dropping, no limits on the fit).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if len(T_base_eef) != len(views):
        raise ValueError(f"{len(T_base_eef)} robot poses for {len(views)} views")
    K = np.asarray(K, dtype=np.float64)
    dist = _check_dist(dist)
    rejected = {i: v.reject_reason for i, v in enumerate(views) if not v.ok}
    used = [i for i, v in enumerate(views) if v.ok]
    usable = len(used)
    poses = [np.asarray(T, dtype=np.float64) for T in T_base_eef]
    corners = spec.corners_board()
    _require_views(used, rejected, limits)
    sigma = float(np.median([views[i].reprojection_rms_px for i in used]))
    view_px_limit = max(limits.view_noise_factor * sigma, limits.view_floor_px)
    warnings: list[str] = []

    X = Y = None
    per_method: dict[str, dict[str, float]] = {}
    method = ""
    need = max(limits.min_views, int(np.ceil((1 - limits.max_dropped_fraction) * usable)))
    refusing = False  # too many views dropped: keep dropping only to name every suspect
    while True:
        if not refusing:
            _require_views(used, rejected, limits)
            coverage = _check_rotations(kind, [poses[i] for i in used], limits)
        chain = _Chain(kind, poses, views, used, corners, K, dist)
        if X is None:
            X, Y, method, per_method = _initial_guess(kind, poses, views, used, chain)
            if not refine:
                break
            X, Y, outside = _consensus_guess(
                kind, poses, views, used, chain, (X, Y), view_px_limit, limits.max_view_mm
            )
            method += "+LM"
        X, Y = _robust_fit(chain, X, Y)
        rms = chain.view_rms(X, Y)
        mm = chain.view_mm(rms)
        relative = max(limits.outlier_factor * float(np.median(rms)), limits.outlier_floor_px)
        score = np.maximum.reduce([rms / relative, rms / view_px_limit, mm / limits.max_view_mm])
        worst = int(np.argmax(score))
        if score[worst] > 1.0:
            # Drop the worst view only, then re-solve: one bad view inflates the others.
            rejected[used[worst]] = (
                f"disagrees with the other views: {rms[worst]:.2f} px, {mm[worst]:.1f} mm at "
                f"the board through the calibrated chain (limits "
                f"{min(relative, view_px_limit):.2f} px, {limits.max_view_mm:g} mm): its robot "
                "pose or detection is off"
            )
            used = [i for k, i in enumerate(used) if k != worst]
            refusing = refusing or len(used) < need
            if not refusing or len(used) > 4:
                continue
        if not refusing:
            break
        suspects = {i: r for i, r in rejected.items() if r.startswith("disagrees")}
        # A fit on few views can absorb one wrong view; the start most views agreed with
        # names those too.
        suspects = dict(sorted((outside | suspects).items()))
        named = (
            f"views {', '.join(map(str, suspects))} disagree"
            if len(suspects) > 1
            else f"view {next(iter(suspects))} disagrees"
        )
        raise CalibrationError(
            f"{named} with the others ({usable - len(suspects)} of {usable} usable views "
            f"would be left, need {need}): check that each robot pose is read with the arm at "
            "rest, then recapture those views or add more; "
            + "; ".join(f"view {i}: {r}" for i, r in suspects.items())
        )

    if refine:
        X, Y = _refine(chain.residuals, X, Y)
    rms_all = chain.view_rms(X, Y)
    chain_rms = float(np.sqrt(np.average(rms_all**2, weights=chain.counts)))
    chain_mm = float(np.sqrt(np.average(chain.view_mm(rms_all) ** 2, weights=chain.counts)))
    loo_mm, loo_deg, loo_worst = float("nan"), float("nan"), None
    if refine:
        chain_px_limit = max(limits.chain_noise_factor * sigma, limits.chain_floor_px)
        if chain_rms > chain_px_limit or chain_mm > limits.max_chain_mm:
            raise CalibrationError(
                f"the views disagree as a whole: {chain_rms:.2f} px, {chain_mm:.1f} mm at the "
                f"board through the calibrated chain (limits {chain_px_limit:.2f} px, "
                f"{limits.max_chain_mm:g} mm; single views show {sigma:.2f} px): check the "
                "board's square size, that it is flat and rigidly mounted, and that robot poses "
                "are read with the arm at rest"
            )
        loo_mm, loo_deg, loo_worst = _leave_one_out(chain, X, Y, used)
        if loo_mm > limits.max_loo_mm or loo_deg > limits.max_loo_deg:
            raise CalibrationError(
                f"leaving view {loo_worst} out moves the answer by {loo_mm:.1f} mm, "
                f"{loo_deg:.2f}° (limits {limits.max_loo_mm:g} mm, {limits.max_loo_deg:g}°): "
                "the views do not pin it down; add views with more varied positions and tilts"
            )
        if loo_mm > limits.good_loo_mm or loo_deg > limits.good_loo_deg:
            warnings.append(
                f"leaving view {loo_worst} out moves the answer by {loo_mm:.2f} mm, "
                f"{loo_deg:.3f}° (good: ≤ {limits.good_loo_mm:g} mm, {limits.good_loo_deg:g}°)"
            )
        if chain_mm > limits.good_chain_mm:
            warnings.append(
                f"chain residual {chain_mm:.2f} mm at the board (good: ≤ {limits.good_chain_mm:g})"
            )
    if coverage.off_axis_deg < limits.warn_off_axis_deg:
        warnings.insert(
            0,
            f"the wrist turned almost only about {coverage.describe_axis()} (at most "
            f"{coverage.off_axis_deg:.1f}° about any other; good: ≥ "
            f"{limits.warn_off_axis_deg:g}°): {coverage.motion_to_add()}",
        )

    per_view = []
    trans_mm, rot_deg = [], []
    for k, i in enumerate(used):
        T_pred = _predicted_T_cam_board(kind, X, Y, poses[i])
        dt, dr = pose_error(T_pred, views[i].T_cam_board)
        trans_mm.append(dt)
        rot_deg.append(dr)
        per_view.append(
            {
                "view": i,
                "corners": len(views[i].ids),
                "pnp_rms_px": views[i].reprojection_rms_px,
                "chain_rms_px": float(rms_all[k]),
                "chain_mm_at_board": float(chain.view_mm(rms_all)[k]),
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
        reprojection_rms_px=chain_rms,
        pnp_rms_px=float(np.mean([views[i].reprojection_rms_px for i in used])),
        residual_trans_mm=float(np.median(trans_mm)),
        residual_rot_deg=float(np.median(rot_deg)),
        rotation_spread_deg=coverage.spread_deg,
        corner_noise_px=sigma,
        chain_rms_mm=chain_mm,
        coverage=coverage,
        loo_spread_mm=loo_mm,
        loo_spread_deg=loo_deg,
        loo_worst_view=loo_worst,
        verdict="marginal" if warnings else "good",
        warnings=warnings,
        per_method=per_method,
        per_view=per_view,
    )


def rotation_axis_coverage(kind: str, T_base_eef: list[np.ndarray]) -> AxisCoverage:
    """How the gripper's relative rotations spread over axes (see `AxisCoverage`).

    The hand-eye equations use the motion between two poses i, j: for eye-in-hand
    ``R_i^T R_j`` (an axis in the gripper frame), for eye-to-hand ``R_i R_j^T`` (in the
    base frame). Their rotation vectors, stacked, span one direction when the wrist only
    turned about one axis.
    """
    Rs = [np.asarray(T, dtype=np.float64)[:3, :3] for T in T_base_eef]
    rel = []
    for a in range(len(Rs)):
        for b in range(a + 1, len(Rs)):
            R = Rs[a].T @ Rs[b] if kind == "eye_in_hand" else Rs[a] @ Rs[b].T
            rel.append(np.rad2deg(matrix_to_rotvec(R)))
    frame = "gripper" if kind == "eye_in_hand" else "base"
    if not rel:
        return AxisCoverage(np.array([0.0, 0.0, 1.0]), frame, 0.0, 0.0)
    r = np.array(rel)
    axis = np.linalg.svd(r, full_matrices=False)[2][0]
    off = np.linalg.norm(r - np.outer(r @ axis, axis), axis=1)
    return AxisCoverage(
        axis=axis * (1.0 if axis[np.argmax(np.abs(axis))] > 0 else -1.0),
        frame=frame,
        off_axis_deg=float(off.max()),
        spread_deg=float(np.linalg.norm(r, axis=1).max()),
    )


# --------------------------------------------------------------------------- internals


def _require_views(used: list[int], rejected: dict[int, str], limits: HandEyeLimits) -> None:
    if len(used) < limits.min_views:
        raise CalibrationError(
            f"{len(used)} usable views, need {limits.min_views}; rejected: "
            + "; ".join(f"view {i}: {r}" for i, r in sorted(rejected.items()))
        )


def _check_rotations(kind: str, poses: list[np.ndarray], limits: HandEyeLimits) -> AxisCoverage:
    coverage = rotation_axis_coverage(kind, poses)
    if coverage.spread_deg < limits.min_rotation_spread_deg:
        raise CalibrationError(
            f"the gripper turned through only {coverage.spread_deg:.1f}° across the views "
            f"(need {limits.min_rotation_spread_deg:.0f}°): tilt and turn the wrist more"
        )
    if coverage.off_axis_deg < limits.min_off_axis_deg:
        raise CalibrationError(
            f"every turn of the wrist between views is about one axis, "
            f"{coverage.describe_axis()} (at most {coverage.off_axis_deg:.1f}° about any "
            f"other, need {limits.min_off_axis_deg:g}°): the camera's position along it cannot "
            f"be found. {coverage.motion_to_add()[0].upper()}{coverage.motion_to_add()[1:]} "
            f"(by {limits.warn_off_axis_deg:g}° or more) in several views"
        )
    return coverage


def _check_dist(dist: np.ndarray | None) -> np.ndarray:
    d = np.zeros(5) if dist is None else np.asarray(dist, dtype=np.float64).ravel()
    if d.size > 5 and np.any(d[5:] != 0):
        raise ValueError(
            f"distortion {d.tolist()}: only OpenCV's 5-coefficient model (k1, k2, p1, p2, k3) "
            "is supported; undistort the images first"
        )
    return np.pad(d, (0, max(0, 5 - d.size)))[:5]


def _predicted_T_cam_board(kind: str, X: np.ndarray, Y: np.ndarray, T_base_eef: np.ndarray):
    """The board pose in the camera that the unknowns X, Y predict for one robot pose."""
    if kind == "eye_to_hand":  # X = T_base_cam, Y = T_eef_board
        return inv_T(X) @ T_base_eef @ Y
    return inv_T(X) @ inv_T(T_base_eef) @ Y  # X = T_eef_cam, Y = T_base_board


class _Chain:
    """Every used corner through the chain, vectorised over views: the predicted board pose
    of view k is ``inv(X) @ P[k] @ Y`` with P the robot pose (eye-to-hand) or its inverse."""

    def __init__(self, kind, poses, views, used, corners, K, dist) -> None:
        self.P = np.stack([poses[i] if kind == "eye_to_hand" else inv_T(poses[i]) for i in used])
        self.counts = np.array([len(views[i].ids) for i in used])
        self.vid = np.repeat(np.arange(len(used)), self.counts)
        self.obj = np.concatenate([corners[views[i].ids] for i in used])
        self.uv = np.concatenate([views[i].corners_px for i in used])
        self.view_depth = np.array(
            [
                (views[i].T_cam_board[:3, :3] @ corners[views[i].ids].mean(0))[2]
                + views[i].T_cam_board[2, 3]
                for i in used
            ]
        )
        self.K, self.dist = K, dist
        self.focal = float((K[0, 0] + K[1, 1]) / 2)
        self.weights: np.ndarray | None = None  # per view, for the robust fit

    def without_many(self, ks) -> _Chain:
        """The same chain less the views ``ks`` (positions in this chain)."""
        c = object.__new__(_Chain)
        keep = ~np.isin(self.vid, ks)
        c.P = np.delete(self.P, ks, axis=0)
        c.counts = np.delete(self.counts, ks)
        c.vid = np.repeat(np.arange(len(c.counts)), c.counts)
        c.obj, c.uv = self.obj[keep], self.uv[keep]
        c.view_depth = np.delete(self.view_depth, ks)
        c.K, c.dist, c.focal, c.weights = self.K, self.dist, self.focal, None
        return c

    def residuals(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """float64[2 M]: predicted minus detected pixels of every corner (weighted when
        ``weights`` is set)."""
        T = inv_T(X)[None] @ self.P @ Y[None]  # [n, 4, 4] T_cam_board per view
        Tv = T[self.vid]
        p = np.einsum("mij,mj->mi", Tv[:, :3, :3], self.obj) + Tv[:, :3, 3]
        x, y = p[:, 0] / p[:, 2], p[:, 1] / p[:, 2]
        k1, k2, p1, p2, k3 = self.dist
        r2 = x * x + y * y
        radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
        xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        K = self.K
        r = (
            np.stack([K[0, 0] * xd + K[0, 1] * yd + K[0, 2], K[1, 1] * yd + K[1, 2]], axis=1)
            - self.uv
        )
        if self.weights is not None:
            r = r * np.sqrt(self.weights)[self.vid, None]
        return r.ravel()

    def view_mm(self, rms_px: np.ndarray) -> np.ndarray:
        """Pixel residuals of the views as millimetres at each view's board distance."""
        return rms_px * self.view_depth / self.focal * 1e3

    def view_rms(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """float64[n]: each view's RMS corner error through the chain, pixels (unweighted)."""
        w, self.weights = self.weights, None
        r = self.residuals(X, Y).reshape(-1, 2)
        self.weights = w
        return np.sqrt(np.bincount(self.vid, np.sum(r**2, axis=1)) / self.counts)


def _initial_guess(kind, poses, views, used, chain: _Chain):
    """OpenCV's methods on the used views; the one whose median view fits best wins (a
    median, so that a few wrong views do not choose the method)."""
    per_method, best = {}, None
    for method in METHODS:
        try:
            X, Y = _opencv_solve(kind, [poses[i] for i in used], [views[i] for i in used], method)
        except Exception as e:  # noqa: BLE001 - a method can fail on degenerate data
            per_method[method] = {"error": str(e)}
            continue
        rms = chain.view_rms(X, Y)
        per_method[method] = {
            "reprojection_rms_px": float(np.sqrt(np.average(rms**2, weights=chain.counts))),
            "median_view_rms_px": float(np.median(rms)),
        }
        if best is None or np.median(rms) < best[0]:
            best = (float(np.median(rms)), method, X, Y)
    if best is None:
        raise CalibrationError(f"every OpenCV hand-eye method failed: {per_method}")
    return best[2], best[3], best[1], per_method


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


def _consensus_guess(kind, poses, views, used, chain: _Chain, start, px_limit, mm_limit):
    """A start that most views agree with, found as RANSAC does: hand-eye solves on small
    subsets of views (all of them for a few views, random ones for many), each scored by
    how many views fit it within the limits; the best is refined on the views it fits.
    Returns (X, Y, {view: reason} for the views outside that consensus).

    With a third of the views wrong, a solve on all of them (and the median residual
    judging it) is dragged towards the wrong ones; a subset of right views is not.
    """
    n = len(used)
    rng = np.random.default_rng(0)
    subsets = [None]  # None: the start from all views
    if n <= 8:
        from itertools import combinations

        subsets += [list(c) for c in combinations(range(n), 4)]
    else:
        subsets += [sorted(rng.choice(n, 4, replace=False)) for _ in range(60)]

    def agree(X, Y):
        rms = chain.view_rms(X, Y)
        ok = (rms <= px_limit) & (chain.view_mm(rms) <= mm_limit)
        return int(ok.sum()), float(np.median(np.sort(rms)[: max(int(ok.sum()), 1)])), ok, rms

    best = None  # (views agreeing, their median RMS, agreeing mask, X, Y, every view's RMS)
    for sub in subsets:
        if sub is None:
            X, Y = start
        else:
            idx = [used[k] for k in sub]
            try:
                X, Y = _opencv_solve(kind, [poses[i] for i in idx], [views[i] for i in idx], "TSAI")
            except Exception:  # noqa: BLE001 - a subset can be degenerate
                continue
            if n <= 8:  # few subsets: afford fitting each to its own views' corners
                rest = [k for k in range(n) if k not in sub]
                X, Y = _refine(chain.without_many(rest).residuals, X, Y, iterations=8)
        count, med, ok, rms = agree(X, Y)
        if best is None or (count, -med) > (best[0], -best[1]):
            best = (count, med, ok, X, Y, rms)
    _, _, ok, X, Y, rms = best
    if ok.sum() >= 3:
        fit = chain.without_many(np.flatnonzero(~ok))
        X, Y = _refine(fit.residuals, X, Y, iterations=10)
        rms = chain.view_rms(X, Y)
        ok = (rms <= px_limit) & (chain.view_mm(rms) <= mm_limit)
    mm = chain.view_mm(rms)
    outside = {
        used[k]: f"disagrees with the views most agree with: {rms[k]:.2f} px, {mm[k]:.1f} mm "
        f"at the board (limits {px_limit:.2f} px, {mm_limit:g} mm)"
        for k in np.flatnonzero(~ok)
    }
    return X, Y, outside


def _robust_fit(chain: _Chain, X: np.ndarray, Y: np.ndarray, rounds: int = 4):
    """Iteratively reweighted refinement: each view weighted by a Cauchy function of its
    RMS against twice the median view's, so views far from the rest pull little."""
    for _ in range(rounds):
        rms = chain.view_rms(X, Y)
        scale = max(2.0 * float(np.median(rms)), 1e-3)
        chain.weights = 1.0 / (1.0 + (rms / scale) ** 2)
        X, Y = _refine(chain.residuals, X, Y, iterations=15)
    chain.weights = None
    return X, Y


def _leave_one_out(chain: _Chain, X: np.ndarray, Y: np.ndarray, used: list[int]):
    """(mm, degrees, view): the largest change of X when one view is left out, and which."""
    worst = (0.0, 0.0, None)
    for k in range(len(used)):
        Xk, _ = _refine(chain.without_many([k]).residuals, X, Y, iterations=8)
        mm, deg = pose_error(Xk, X)
        # Millimetres and degrees weighed as the limits weigh them (1 mm ~ 0.1°).
        if worst[2] is None or mm + 10 * deg > worst[0] + 10 * worst[1]:
            worst = (mm, deg, used[k])
    return worst


def _perturb(T: np.ndarray, d: np.ndarray) -> np.ndarray:
    """T with a small rotation (left-multiplied, rotvec d[:3]) and translation d[3:] added."""
    return make_T(rotvec_to_matrix(d[:3]) @ T[:3, :3], T[:3, 3] + d[3:6])


def _refine(residuals, X, Y, iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Levenberg–Marquardt on the 12 parameters of (X, Y), numeric Jacobian.

    Small (a dozen parameters, a few thousand residuals), so a hand-written loop is plainer
    than a dependency; parameters are increments applied on the left of the current
    estimates, which keeps rotations away from rotation-vector singularities.
    """

    def at(d: np.ndarray) -> np.ndarray:
        return residuals(_perturb(X, d[:6]), _perturb(Y, d[6:]))

    lam = 1e-3
    r = residuals(X, Y)
    cost = float(r @ r)
    eps = 1e-6
    for _ in range(iterations):
        J = np.empty((r.size, 12))
        for k in range(12):
            d = np.zeros(12)
            d[k] = eps
            J[:, k] = (at(d) - r) / eps
        H, g = J.T @ J, J.T @ r
        improved = False
        for _ in range(10):
            step = -np.linalg.solve(H + lam * np.diag(np.diag(H) + 1e-12), g)
            X_new, Y_new = _perturb(X, step[:6]), _perturb(Y, step[6:])
            r_new = residuals(X_new, Y_new)
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
