"""Camera intrinsics from the device: RealSense cameras carry a factory calibration of their
colour stream per resolution, which is what the runtime uses (no checkerboard needed).

    from calibration.intrinsics import read_device_intrinsics
    intr = read_device_intrinsics(serial="123456789012", width=640, height=480)
    intr.K, intr.depth_scale
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DeviceIntrinsics:
    """The colour stream's pinhole parameters (depth is aligned to it) and the depth unit."""

    serial: str
    name: str
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    distortion_model: str
    distortion_coeffs: tuple[float, ...]
    depth_scale: float  # metres per depth count

    @property
    def K(self) -> np.ndarray:
        """float64[3, 3] camera matrix."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def as_array(self) -> np.ndarray:
        """float32[4] fx, fy, cx, cy (the layout of observations and calibration files)."""
        return np.array([self.fx, self.fy, self.cx, self.cy], np.float32)


def intrinsics_of(camera: Any) -> DeviceIntrinsics:
    """The intrinsics of a connected `envs.realsense.RealSenseCamera`."""
    if not camera.is_connected:
        raise RuntimeError("connect the camera first: intrinsics are read from the device")
    fx, fy, cx, cy = (float(x) for x in camera.intrinsics)
    model, coeffs = camera.distortion
    return DeviceIntrinsics(
        serial=camera.serial,
        name=camera.name,
        fx=fx,
        fy=fy,
        cx=cx,
        cy=cy,
        width=int(camera.image_size[0]),
        height=int(camera.image_size[1]),
        distortion_model=str(model),
        distortion_coeffs=tuple(float(c) for c in coeffs),
        depth_scale=float(camera.depth_scale),
    )


def read_device_intrinsics(
    serial: str | None = None,
    width: int = 640,
    height: int = 480,
    fps: int = 30,
    recording: str | None = None,
) -> DeviceIntrinsics:
    """Open a camera (or a recording) briefly and read its intrinsics and depth unit."""
    from envs.realsense import RealSenseCamera, RealSenseConfig

    config = RealSenseConfig(
        serial=serial, width=width, height=height, fps=fps, recording=recording
    )
    with RealSenseCamera(config) as camera:
        return intrinsics_of(camera)
