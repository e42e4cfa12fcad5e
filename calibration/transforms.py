"""Rigid transforms in numpy for calibration and arm control (no torch, no OpenCV).

``T_a_b`` is a float64[4, 4] that maps points in frame b to frame a (DESIGN.md). Rotations
as rotation vectors (axis × angle, radians) are what UR controllers and OpenCV use;
quaternions are (x, y, z, w) as in the environments' proprioception.
"""

from __future__ import annotations

import numpy as np


def make_T(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """float64[4, 4] from a rotation[3, 3] and a translation[3]."""
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = np.asarray(t, dtype=np.float64).reshape(3)
    return T


def inv_T(T_a_b: np.ndarray) -> np.ndarray:
    """T_b_a, using the transpose of the rotation."""
    R, t = T_a_b[:3, :3], T_a_b[:3, 3]
    return make_T(R.T, -R.T @ t)


def rotvec_to_matrix(rotvec: np.ndarray) -> np.ndarray:
    """Rodrigues: axis × angle (radians)[3] -> rotation[3, 3]."""
    r = np.asarray(rotvec, dtype=np.float64).reshape(3)
    theta = float(np.linalg.norm(r))
    if theta < 1e-12:
        return np.eye(3) + _skew(r)  # first order; exact to machine precision here
    k = r / theta
    K = _skew(k)
    return np.eye(3) + np.sin(theta) * K + (1.0 - np.cos(theta)) * (K @ K)


def matrix_to_rotvec(R: np.ndarray) -> np.ndarray:
    """rotation[3, 3] -> axis × angle[3], angle in [0, π]."""
    R = np.asarray(R, dtype=np.float64)
    cos = np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)
    w = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    sin = np.linalg.norm(w) / 2.0
    theta = np.arctan2(sin, cos)
    if theta < 1e-12:
        return w / 2.0
    if theta < np.pi / 2 or sin > 1e-4:
        return w / (2.0 * sin) * theta
    # Near π the antisymmetric part vanishes: read the axis from the symmetric part,
    # R + R^T = 2 cos θ I + 2 (1 - cos θ) a a^T, and its sign from what is left of w.
    S = (R + R.T) / 2.0 - cos * np.eye(3)
    i = int(np.argmax(np.diag(S)))
    axis = S[i] / np.linalg.norm(S[i])
    if axis @ w < 0:
        axis = -axis
    return axis * theta


def rotation_angle_deg(R: np.ndarray) -> float:
    """Angle of a rotation in degrees, accurate for small angles (atan2, not arccos)."""
    return float(np.rad2deg(np.linalg.norm(matrix_to_rotvec(R))))


def pose_error(T_est: np.ndarray, T_true: np.ndarray) -> tuple[float, float]:
    """(translation error in mm, rotation error in degrees) of an estimated transform."""
    trans_mm = float(np.linalg.norm(T_est[:3, 3] - T_true[:3, 3]) * 1e3)
    rot_deg = rotation_angle_deg(T_est[:3, :3] @ T_true[:3, :3].T)
    return trans_mm, rot_deg


def quat_xyzw_to_matrix(q: np.ndarray) -> np.ndarray:
    x, y, z, w = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quat_xyzw(R: np.ndarray) -> np.ndarray:
    """rotation[3, 3] -> unit quaternion (x, y, z, w) with w >= 0."""
    R = np.asarray(R, dtype=np.float64)
    tr = np.trace(R)
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = [(R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s, s / 4]
    else:
        i = int(np.argmax(np.diag(R)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + R[i, i] - R[j, j] - R[k, k])
        q = [0.0, 0.0, 0.0, (R[k, j] - R[j, k]) / s]
        q[i] = s / 4
        q[j] = (R[j, i] + R[i, j]) / s
        q[k] = (R[k, i] + R[i, k]) / s
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return q if q[3] >= 0 else -q


def mean_rotation(Rs: np.ndarray) -> np.ndarray:
    """The rotation nearest (chordal L2) to the mean of rotations[K, 3, 3]."""
    U, _, Vt = np.linalg.svd(np.sum(Rs, axis=0))
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    return U @ D @ Vt


def check_rigid(T: np.ndarray, name: str = "T", tol: float = 1e-4) -> np.ndarray:
    """T as float64[4, 4], or ValueError if it is not a proper rigid transform."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ValueError(f"{name} must be a finite 4x4 matrix, got shape {T.shape}")
    R = T[:3, :3]
    if not np.allclose(R @ R.T, np.eye(3), atol=tol) or np.linalg.det(R) < 0:
        raise ValueError(f"{name} has a rotation part that is not a proper rotation:\n{R}")
    if not np.allclose(T[3], [0.0, 0.0, 0.0, 1.0], atol=tol):
        raise ValueError(f"{name} bottom row must be [0, 0, 0, 1], got {T[3]}")
    return T


def _skew(v: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
