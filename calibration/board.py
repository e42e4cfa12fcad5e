"""ChArUco boards: their definition, a printable image, detection and the board's pose.

Board frame (OpenCV's): origin at the board's top-left corner as printed, x along the
rows to the right, y down the printed image, z = x × y into the board (the printed face
looks along -z). Corners are ChArUco's inner chessboard corners, metres.

Needs OpenCV >= 4.7 < 5 (`cv2.aruco.CharucoDetector`; 5.x lacks `calibrateHandEye`),
which the `real` extra installs.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from calibration.transforms import make_T

OPENCV_EXTRA_HINT = "pip install 'mu0[real]'"


def import_cv2() -> Any:
    """cv2 with ArUco and hand-eye calibration, or an ImportError naming the extra."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError(f"calibration needs OpenCV: {OPENCV_EXTRA_HINT} ({e})") from e
    if not hasattr(cv2, "aruco") or not hasattr(cv2, "calibrateHandEye"):
        raise ImportError(
            f"OpenCV {cv2.__version__} lacks cv2.aruco or cv2.calibrateHandEye; "
            f"install opencv-python>=4.11,<5 ({OPENCV_EXTRA_HINT})"
        )
    return cv2


@dataclass(frozen=True)
class CharucoBoardSpec:
    """A ChArUco board: ``squares_x`` × ``squares_y`` squares of ``square_m`` metres with
    ArUco markers of ``marker_m`` from ``dictionary`` (an OpenCV name such as
    "DICT_4X4_50"). Measure the printed squares: the calibration is only as right as
    ``square_m``."""

    squares_x: int = 6
    squares_y: int = 5
    square_m: float = 0.025
    marker_m: float = 0.0185
    dictionary: str = "DICT_4X4_50"

    def __post_init__(self) -> None:
        if self.squares_x < 3 or self.squares_y < 3:
            raise ValueError(f"a ChArUco board needs at least 3x3 squares, got {self}")
        if not 0 < self.marker_m < self.square_m:
            raise ValueError(f"marker_m must be in (0, square_m), got {self}")

    @property
    def size_m(self) -> tuple[float, float]:
        """(width, height) of the squared area in metres."""
        return self.squares_x * self.square_m, self.squares_y * self.square_m

    @property
    def num_corners(self) -> int:
        return (self.squares_x - 1) * (self.squares_y - 1)

    def corners_board(self) -> np.ndarray:
        """float64[num_corners, 3]: corner positions in the board frame, indexed by id."""
        return np.asarray(_cv_board(self).getChessboardCorners(), dtype=np.float64)

    def image(self, px_per_square: int = 100, margin_px: int = 0) -> np.ndarray:
        """uint8[H, W] printable image; each square exactly ``px_per_square`` pixels."""
        w = self.squares_x * px_per_square + 2 * margin_px
        h = self.squares_y * px_per_square + 2 * margin_px
        return _cv_board(self).generateImage((w, h), marginSize=margin_px, borderBits=1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharucoBoardSpec:
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> CharucoBoardSpec:
        """From "6x5:25mm:18.5mm:DICT_4X4_50" (squares, square size, marker size, dictionary;
        sizes in mm or m with their unit)."""
        m = re.fullmatch(
            r"(\d+)x(\d+):([\d.]+)(mm|m):([\d.]+)(mm|m)(?::(\w+))?", text.strip().replace(" ", "")
        )
        if not m:
            raise ValueError(
                f"board {text!r} is not like 6x5:25mm:18.5mm:DICT_4X4_50 "
                "(squares x, squares y, square size, marker size, dictionary)"
            )
        sx, sy, sq, squ, mk, mku, dictionary = m.groups()
        scale = {"mm": 1e-3, "m": 1.0}
        return cls(
            squares_x=int(sx),
            squares_y=int(sy),
            square_m=float(sq) * scale[squ],
            marker_m=float(mk) * scale[mku],
            dictionary=dictionary or "DICT_4X4_50",
        )


@functools.lru_cache(maxsize=8)
def _cv_board(spec: CharucoBoardSpec) -> Any:
    cv2 = import_cv2()
    dict_id = getattr(cv2.aruco, spec.dictionary, None)
    if dict_id is None:
        raise ValueError(f"unknown ArUco dictionary {spec.dictionary!r}")
    dictionary = cv2.aruco.getPredefinedDictionary(dict_id)
    return cv2.aruco.CharucoBoard(
        (spec.squares_x, spec.squares_y), spec.square_m, spec.marker_m, dictionary
    )


@dataclass(frozen=True)
class DetectionLimits:
    """When a view of the board is not good enough to calibrate with."""

    min_corners: int = 8
    # Corners must span an area, not a line: the smaller spread over the larger one.
    min_spread_ratio: float = 0.2
    # The board pose must reproject onto the corners within this (RMS, pixels). None: a
    # share of the image diagonal, so the limit means the same at every resolution:
    # 3.2 px at 640x480, 5.9 px at 1280x720. ChArUco corners on sharp renders measure
    # 0.05-0.1 px; 1 px of corner noise (blur, a soft print) gives about 1.3 px and stays
    # in; a corner given the wrong id (off by a square, tens of pixels) does not. The
    # hand-eye solve then judges views against the noise the session actually shows.
    max_reprojection_px: float | None = None
    reprojection_share_of_diagonal: float = 0.004
    # Beyond this tilt the corners foreshorten and their positions get noisy.
    max_tilt_deg: float = 70.0

    def reprojection_limit_px(self, image_wh: tuple[int, int]) -> float:
        if self.max_reprojection_px is not None:
            return float(self.max_reprojection_px)
        return self.reprojection_share_of_diagonal * float(np.hypot(*image_wh))


@dataclass(frozen=True, repr=False)
class BoardView:
    """One image's detection. ``reject_reason`` is None for a usable view.

    ids: int[n] corner ids; corners_px: float64[n, 2] pixels; T_cam_board: float64[4, 4]
    (None if no pose); reprojection_rms_px: the pose's RMS reprojection error.
    """

    ids: np.ndarray
    corners_px: np.ndarray
    T_cam_board: np.ndarray | None
    reprojection_rms_px: float
    tilt_deg: float
    reject_reason: str | None

    @property
    def ok(self) -> bool:
        return self.reject_reason is None

    def __repr__(self) -> str:
        state = "ok" if self.ok else f"rejected: {self.reject_reason}"
        return (
            f"BoardView({len(self.ids)} corners, rms {self.reprojection_rms_px:.3f} px, "
            f"tilt {self.tilt_deg:.0f}°, {state})"
        )


def _rejected(ids: np.ndarray, corners: np.ndarray, reason: str) -> BoardView:
    return BoardView(ids, corners, None, float("nan"), float("nan"), reason)


def detect_board(
    image: np.ndarray,
    spec: CharucoBoardSpec,
    K: np.ndarray,
    dist: np.ndarray | None = None,
    limits: DetectionLimits = DetectionLimits(),
) -> BoardView:
    """Find the board in an RGB (or grey) uint8 image and estimate ``T_cam_board``.

    K: float64[3, 3] camera matrix; dist: OpenCV distortion coefficients (None = none).
    A view is rejected (``reject_reason`` set, never an exception) when too few corners
    are found, when they lie near a line, when the board is seen too obliquely or when the
    pose does not reproject onto the corners within ``limits.max_reprojection_px``.
    """
    cv2 = import_cv2()
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    K = np.asarray(K, dtype=np.float64)
    dist = np.zeros(5) if dist is None else np.asarray(dist, dtype=np.float64)
    board = _cv_board(spec)
    charuco_params = cv2.aruco.CharucoParameters()
    charuco_params.cameraMatrix = K
    charuco_params.distCoeffs = dist
    detector_params = cv2.aruco.DetectorParameters()
    detector_params.cornerRefinementMethod = cv2.aruco.CORNER_REFINE_SUBPIX
    detector = cv2.aruco.CharucoDetector(board, charuco_params, detector_params)
    corners, ids, _, _ = detector.detectBoard(gray)
    empty_ids, empty_px = np.zeros(0, np.int64), np.zeros((0, 2))
    if ids is None or len(ids) == 0:
        return _rejected(empty_ids, empty_px, "board not found")
    ids = ids.reshape(-1).astype(np.int64)
    corners_px = corners.reshape(-1, 2).astype(np.float64)
    n = len(ids)
    if n < limits.min_corners:
        return _rejected(ids, corners_px, f"only {n} corners (need {limits.min_corners})")
    obj = spec.corners_board()[ids]
    centred = obj[:, :2] - obj[:, :2].mean(axis=0)
    s = np.linalg.svd(centred, compute_uv=False)
    if s[1] < limits.min_spread_ratio * s[0]:
        return _rejected(ids, corners_px, "corners nearly on a line")
    ok, rvec, tvec = cv2.solvePnP(obj, corners_px, K, dist, flags=cv2.SOLVEPNP_IPPE)
    if not ok:
        return _rejected(ids, corners_px, "no pose (solvePnP failed)")
    rvec, tvec = cv2.solvePnPRefineLM(obj, corners_px, K, dist, rvec, tvec)
    R, _ = cv2.Rodrigues(rvec)
    T_cam_board = make_T(R, tvec.reshape(3))
    projected, _ = cv2.projectPoints(obj, rvec, tvec, K, dist)
    rms = float(np.sqrt(np.mean(np.sum((projected.reshape(-1, 2) - corners_px) ** 2, axis=1))))
    # Tilt: angle between the board's normal and the ray to its centre.
    centre_cam = T_cam_board[:3, :3] @ obj.mean(axis=0) + T_cam_board[:3, 3]
    normal_cam = T_cam_board[:3, 2]
    cos = abs(normal_cam @ centre_cam) / np.linalg.norm(centre_cam)
    tilt = float(np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0))))
    reason = None
    if tvec.reshape(3)[2] <= 0:
        reason = "pose behind the camera"
    elif tilt > limits.max_tilt_deg:
        reason = f"board tilted {tilt:.0f}° from the view ray (max {limits.max_tilt_deg:.0f}°)"
    elif rms > (limit := limits.reprojection_limit_px((gray.shape[1], gray.shape[0]))):
        reason = f"reprojection {rms:.2f} px (max {limit:.2f})"
    return BoardView(ids, corners_px, T_cam_board, rms, tilt, reason)


def project_board(
    spec: CharucoBoardSpec, ids: np.ndarray, T_cam_board: np.ndarray, K: np.ndarray
) -> np.ndarray:
    """float64[n, 2]: pixels of the corners ``ids`` for a board at ``T_cam_board`` (pinhole)."""
    p = spec.corners_board()[ids] @ T_cam_board[:3, :3].T + T_cam_board[:3, 3]
    uv = p[:, :2] / p[:, 2:3]
    return uv * np.array([K[0, 0], K[1, 1]]) + np.array([K[0, 2], K[1, 2]])
