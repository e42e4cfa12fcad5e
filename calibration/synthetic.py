"""Hand-eye pose sets with a known answer, for tests and `mu0 bench calibration --sweep`.

A pinhole camera sees a ChArUco board's corners (projected, Gaussian pixel noise, the board
pose then measured by PnP as from a real detection); the robot poses are exact or, for the
views named in ``bad``, off by a known translation and rotation, as when a pose is read at
the wrong moment. ``rotations`` chooses how the gripper turns between views:

- "general": about random axes, tens of degrees;
- "one_axis": about one axis of the gripper only (jogging a single wrist joint);
- "near_one_axis": the same with every turn also tilted ``off_axis_deg`` about another axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from calibration.board import BoardView, CharucoBoardSpec, import_cv2
from calibration.transforms import inv_T, make_T, rotvec_to_matrix

# A 640x480 camera with a 600 px focal length, and the unknowns the solver must recover.
K_640 = np.array([[600.0, 0.0, 319.5], [0.0, 600.0, 239.5], [0.0, 0.0, 1.0]])
IMAGE_WH = (640, 480)
TRUTH = {
    "eye_to_hand": make_T(rotvec_to_matrix([2.3, 0.1, -0.2]), [0.9, -0.3, 0.6]),  # T_base_cam
    "eye_in_hand": make_T(rotvec_to_matrix([0.05, -0.1, 1.6]), [0.05, 0.0, 0.04]),  # T_eef_cam
}
T_EEF_BOARD = make_T(rotvec_to_matrix([0.2, 0.1, -0.3]), [0.0, 0.05, 0.1])
T_BASE_BOARD = make_T(rotvec_to_matrix([np.pi, 0, 0]), [0.5, 0.0, 0.0])


@dataclass
class PoseSet:
    """Robot poses and board views in the same order, and the answer."""

    kind: str
    T_base_eef: list[np.ndarray]  # what the robot reports (bad views included)
    views: list[BoardView]
    truth: np.ndarray  # T_base_cam or T_eef_cam
    bad: dict[int, tuple[float, float]] = field(default_factory=dict)  # view -> (m, deg)


def _view(T_cam_board, spec, K, rng, pixel_noise, cv2) -> BoardView | None:
    """A board view at a pose, or None where the board is not fully and plainly visible."""
    obj = spec.corners_board()
    p = obj @ T_cam_board[:3, :3].T + T_cam_board[:3, 3]
    if np.any(p[:, 2] < 0.15):
        return None
    centre = T_cam_board[:3, :3] @ obj.mean(0) + T_cam_board[:3, 3]
    cos = abs(T_cam_board[:3, 2] @ centre) / np.linalg.norm(centre)
    if cos < np.cos(np.deg2rad(60.0)):
        return None
    uv = p[:, :2] / p[:, 2:] * K[[0, 1], [0, 1]] + K[:2, 2]
    if np.any(uv < 10) or np.any(uv > np.array(IMAGE_WH) - 10):
        return None
    uv = uv + rng.normal(size=uv.shape) * pixel_noise
    _, rvec, tvec = cv2.solvePnP(obj, uv, K, np.zeros(5), flags=cv2.SOLVEPNP_IPPE)
    rvec, tvec = cv2.solvePnPRefineLM(obj, uv, K, np.zeros(5), rvec, tvec)
    T = make_T(cv2.Rodrigues(rvec)[0], tvec.ravel())
    proj, _ = cv2.projectPoints(obj, rvec, tvec, K, np.zeros(5))
    rms = float(np.sqrt(np.mean(np.sum((proj.reshape(-1, 2) - uv) ** 2, axis=1))))
    tilt = float(np.rad2deg(np.arccos(min(cos, 1.0))))
    return BoardView(np.arange(len(obj)), uv, T, rms, tilt, None)


def make_pose_set(
    kind: str,
    n: int,
    seed: int,
    *,
    pixel_noise: float = 0.3,
    bad: dict[int, tuple[float, float]] | None = None,
    rotations: str = "general",
    off_axis_deg: float = 0.0,
    spec: CharucoBoardSpec | None = None,
    K: np.ndarray = K_640,
) -> PoseSet:
    """``n`` views of ``kind`` ("eye_to_hand" or "eye_in_hand"); ``bad`` maps a view index
    to the (metres, degrees) its robot pose is off by, in random directions."""
    cv2 = import_cv2()
    spec = spec or CharucoBoardSpec()
    # Each kind its own draws: the two would otherwise share their noise.
    rng = np.random.default_rng([seed, list(TRUTH).index(kind)])
    X = TRUTH[kind]
    if rotations not in ("general", "one_axis", "near_one_axis"):
        raise ValueError(f"rotations must be general, one_axis or near_one_axis: {rotations!r}")
    # The reference: the board 0.6 m in front of the camera, facing it.
    T_cam_board0 = make_T(rotvec_to_matrix([np.pi, 0.0, 0.0]), [-0.06, -0.05, 0.6])
    if kind == "eye_to_hand":
        T0 = X @ T_cam_board0 @ inv_T(T_EEF_BOARD)
    else:
        T0 = T_BASE_BOARD @ inv_T(T_cam_board0) @ inv_T(X)
    axis = np.array([0.0, 0.0, 1.0])  # the wrist's last joint
    other = np.array([1.0, 0.0, 0.0])
    poses, views = [], []
    while len(views) < n:
        if rotations == "general":
            T_cam_board = make_T(
                rotvec_to_matrix(rng.normal(size=3) * 0.35) @ T_cam_board0[:3, :3],
                T_cam_board0[:3, 3] + rng.uniform([-0.1, -0.1, -0.15], [0.1, 0.1, 0.2]),
            )
            if kind == "eye_to_hand":
                T = X @ T_cam_board @ inv_T(T_EEF_BOARD)
            else:
                T = T_BASE_BOARD @ inv_T(T_cam_board) @ inv_T(X)
        else:
            R = rotvec_to_matrix(axis * np.deg2rad(rng.uniform(-40, 40)))
            if rotations == "near_one_axis":
                R = rotvec_to_matrix(other * np.deg2rad(rng.uniform(-1, 1) * off_axis_deg)) @ R
            T = make_T(T0[:3, :3] @ R, T0[:3, 3] + rng.uniform(-0.08, 0.08, 3))
            if kind == "eye_to_hand":
                T_cam_board = inv_T(X) @ T @ T_EEF_BOARD
            else:
                T_cam_board = inv_T(X) @ inv_T(T) @ T_BASE_BOARD
        view = _view(T_cam_board, spec, K, rng, pixel_noise, cv2)
        if view is None:
            continue
        poses.append(T)
        views.append(view)
    bad = dict(bad or {})
    for i, (trans_m, rot_deg) in bad.items():
        u = rng.normal(size=3)
        w = rng.normal(size=3)
        dT = make_T(
            rotvec_to_matrix(w / np.linalg.norm(w) * np.deg2rad(rot_deg)),
            u / np.linalg.norm(u) * trans_m,
        )
        poses[i] = poses[i] @ dT
    return PoseSet(kind, poses, views, X, bad)
