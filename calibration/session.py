"""A guided hand-eye capture session: collect (robot pose, board view) pairs, say what
the next view should add, solve, and turn the result into a calibration file.

The session knows nothing about where images and poses come from; `mu0 calibrate` feeds
it from a RealSense camera and an arm (moved by hand in free-drive, or automatically
through poses around the start), or from the simulated rig.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration.board import BoardView, CharucoBoardSpec, DetectionLimits, detect_board
from calibration.files import CameraCalibration
from calibration.handeye import (
    HandEyeLimits,
    HandEyeResult,
    calibrate_hand_eye,
    rotation_axis_coverage,
)
from calibration.transforms import make_T, rotvec_to_matrix

# What a good set looks like (for advice; the solver has its own hard limits).
GOOD_ROTATION_SPREAD_DEG = 40.0
GOOD_TRANSLATION_SPREAD_M = 0.15


@dataclass
class CaptureSession:
    """Views and poses of one calibration, with the camera they were taken with.

    K: float64[3, 3]; dist: OpenCV distortion coefficients (None: pinhole).
    """

    kind: str
    board: CharucoBoardSpec
    K: np.ndarray
    dist: np.ndarray | None = None
    target_views: int = 15
    detection: DetectionLimits = field(default_factory=DetectionLimits)
    limits: HandEyeLimits = field(default_factory=HandEyeLimits)
    poses: list[np.ndarray] = field(default_factory=list)
    views: list[BoardView] = field(default_factory=list)

    def add(self, image: np.ndarray, T_base_eef: np.ndarray) -> BoardView:
        """Detect the board in ``image`` taken with the gripper at ``T_base_eef``; the pair
        is kept either way (a rejected view keeps its reason for the report)."""
        view = detect_board(image, self.board, self.K, self.dist, self.detection)
        self.poses.append(np.asarray(T_base_eef, dtype=np.float64).copy())
        self.views.append(view)
        return view

    def undo(self) -> None:
        if self.views:
            self.views.pop()
            self.poses.pop()

    @property
    def good(self) -> int:
        return sum(v.ok for v in self.views)

    def ready(self) -> bool:
        return self.good >= max(self.target_views, self.limits.min_views)

    def advice(self) -> str:
        """One line on progress and what the next views should add."""
        good_poses = [p for p, v in zip(self.poses, self.views) if v.ok]
        msg = f"{self.good}/{self.target_views} good views"
        if len(good_poses) < 2:
            return msg + "; move the arm so the whole board is in view, then capture"
        coverage = rotation_axis_coverage(self.kind, good_poses)
        rot = coverage.spread_deg
        pos = np.ptp(np.array([p[:3, 3] for p in good_poses]), axis=0)
        tips = []
        if rot < GOOD_ROTATION_SPREAD_DEG:
            tips.append(f"tilt and turn the wrist more (rotation spread {rot:.0f}°)")
        elif coverage.off_axis_deg < self.limits.warn_off_axis_deg:
            tips.append(
                f"{coverage.motion_to_add()} (so far it turned about "
                f"{coverage.describe_axis()} only)"
            )
        if float(np.max(pos)) < GOOD_TRANSLATION_SPREAD_M:
            tips.append(f"spread the positions more ({float(np.max(pos)) * 100:.0f} cm so far)")
        if self.views and not self.views[-1].ok:
            tips.append(f"last view rejected: {self.views[-1].reject_reason}")
        return msg + ("; " + "; ".join(tips) if tips else "; good spread, keep varying")

    def solve(self) -> HandEyeResult:
        return calibrate_hand_eye(
            self.kind, self.poses, self.views, self.board, self.K, self.dist, self.limits
        )

    def to_calibration(
        self,
        result: HandEyeResult,
        camera_serial: str,
        image_size: tuple[int, int],
        camera_name: str = "",
        depth_scale: float | None = None,
        robot: str = "",
        distortion: dict[str, Any] | None = None,
        created_at: dt.datetime | None = None,
    ) -> CameraCalibration:
        K = self.K
        return CameraCalibration(
            kind=self.kind,
            camera_serial=camera_serial,
            camera_name=camera_name,
            intrinsics=(K[0, 0], K[1, 1], K[0, 2], K[1, 2]),
            image_size=image_size,
            T_ref_cam=result.T_ref_cam,
            created_at=created_at or dt.datetime.now(dt.timezone.utc),
            depth_scale=depth_scale,
            distortion=distortion or {"model": "none", "coeffs": []},
            robot=robot,
            board=self.board.to_dict(),
            quality=result.quality() | {"views_captured": len(self.views)},
        )


def poses_around(
    T_center: np.ndarray,
    n: int,
    radius_m: float = 0.08,
    angle_deg: float = 20.0,
    seed: int = 0,
) -> list[np.ndarray]:
    """``n`` end-effector targets around a start pose, for arms that move themselves:
    offsets up to ``radius_m`` and tilts up to ``angle_deg`` about axes spread over the
    sphere (a golden-angle spiral, so consecutive poses differ), applied in the base."""
    rng = np.random.default_rng(seed)
    out = []
    golden = np.pi * (3.0 - np.sqrt(5.0))
    for i in range(n):
        z = 1.0 - 2.0 * (i + 0.5) / n
        r = np.sqrt(1.0 - z * z)
        axis = np.array([np.cos(golden * i) * r, np.sin(golden * i) * r, z])
        angle = np.deg2rad(angle_deg) * (0.5 + 0.5 * rng.random())
        offset = rng.uniform(-1.0, 1.0, 3) * radius_m
        R = rotvec_to_matrix(axis * angle) @ T_center[:3, :3]
        out.append(make_T(R, T_center[:3, 3] + offset))
    return out
