"""Calibration files: one JSON per calibration, timestamped, checked when loaded.

A file records what the runtime needs (the camera's intrinsics and depth unit, and the
hand-eye transform) plus what a person needs to trust it (when, with which camera and
robot, how many views, the residuals). Names sort by time:

    <dir>/<kind>_<serial>_<YYYYmmddTHHMMSSZ>.json

`load_calibration(dir)` takes the newest file for a camera; it refuses a file older than
``max_age_days`` (cameras get bumped, mounts creep), one made for another camera, or one
whose intrinsics no longer match what the camera reports.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.transforms import check_rigid

FORMAT = "mu0-calibration"
VERSION = 1
KINDS = ("eye_to_hand", "eye_in_hand")
DEFAULT_MAX_AGE_DAYS = 30.0


class StaleCalibrationError(ValueError):
    """The calibration is older than allowed."""


class CalibrationMismatchError(ValueError):
    """The calibration was made for another camera, resolution or intrinsics."""


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class CameraCalibration:
    """A camera's calibration.

    kind: "eye_to_hand" (fixed camera; ``T_ref_cam`` is ``T_base_cam``) or "eye_in_hand"
    (wrist camera; ``T_ref_cam`` is ``T_eef_cam``). intrinsics: (fx, fy, cx, cy) pixels of
    an image of ``image_size`` (width, height). created_at: UTC.
    """

    kind: str
    camera_serial: str
    intrinsics: tuple[float, float, float, float]
    image_size: tuple[int, int]
    T_ref_cam: np.ndarray
    created_at: dt.datetime = field(default_factory=_utc_now)
    camera_name: str = ""
    depth_scale: float | None = None
    distortion: dict[str, Any] = field(default_factory=lambda: {"model": "none", "coeffs": []})
    robot: str = ""
    board: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "T_ref_cam", check_rigid(self.T_ref_cam, "T_ref_cam"))
        intr = tuple(float(x) for x in self.intrinsics)
        if len(intr) != 4 or not all(np.isfinite(intr)) or intr[0] <= 0 or intr[1] <= 0:
            raise ValueError(f"intrinsics must be fx, fy, cx, cy with fx, fy > 0, got {intr}")
        object.__setattr__(self, "intrinsics", intr)
        object.__setattr__(self, "image_size", (int(self.image_size[0]), int(self.image_size[1])))
        if self.created_at.tzinfo is None:
            raise ValueError("created_at must be timezone-aware (UTC)")

    # ------------------------------------------------------------------ frames

    @property
    def T_base_cam(self) -> np.ndarray:
        """Camera → base of a fixed camera (eye-to-hand)."""
        if self.kind != "eye_to_hand":
            raise ValueError(
                "a wrist camera has no fixed T_base_cam; use T_base_cam_at(T_base_eef)"
            )
        return self.T_ref_cam.copy()

    @property
    def T_eef_cam(self) -> np.ndarray:
        """Camera → end effector of a wrist camera (eye-in-hand)."""
        if self.kind != "eye_in_hand":
            raise ValueError("a fixed camera has no T_eef_cam; use T_base_cam")
        return self.T_ref_cam.copy()

    def T_base_cam_at(self, T_base_eef: np.ndarray | None) -> np.ndarray:
        """Camera → base when the end effector is at ``T_base_eef`` (ignored for a fixed
        camera; required for a wrist camera, and it should be the pose at the image's
        capture time)."""
        if self.kind == "eye_to_hand":
            return self.T_ref_cam.copy()
        if T_base_eef is None:
            raise ValueError("a wrist camera needs the end-effector pose at capture time")
        return np.asarray(T_base_eef, dtype=np.float64) @ self.T_ref_cam

    # ------------------------------------------------------------------ checks

    def age_days(self, now: dt.datetime | None = None) -> float:
        now = now or _utc_now()
        return (now - self.created_at).total_seconds() / 86400.0

    def check_fresh(self, max_age_days: float, now: dt.datetime | None = None) -> None:
        age = self.age_days(now)
        if age > max_age_days:
            raise StaleCalibrationError(
                f"calibration of camera {self.camera_serial} is {age:.1f} days old "
                f"(made {self.created_at:%Y-%m-%d %H:%M} UTC, limit {max_age_days:g} days): "
                "recalibrate with `mu0 calibrate`, or raise max_age_days if nothing moved"
            )
        if age < -1.0 / 24:  # an hour of clock skew is tolerated
            raise StaleCalibrationError(
                f"calibration of camera {self.camera_serial} is dated in the future "
                f"({self.created_at.isoformat()}); check this machine's clock"
            )

    def check_camera(
        self,
        serial: str | None,
        intrinsics: Any,
        image_size: tuple[int, int],
        tol_px: float = 1.0,
    ) -> None:
        """Raise CalibrationMismatchError unless this is the calibrated camera, at the
        calibrated resolution, with intrinsics within ``tol_px`` of the calibrated ones."""
        if serial and self.camera_serial and serial != self.camera_serial:
            raise CalibrationMismatchError(
                f"calibration is for camera {self.camera_serial}, the camera is {serial}"
            )
        if tuple(int(x) for x in image_size) != self.image_size:
            raise CalibrationMismatchError(
                f"calibration is for {self.image_size[0]}x{self.image_size[1]} images, "
                f"the camera streams {image_size[0]}x{image_size[1]}"
            )
        diff = np.abs(np.asarray(intrinsics, dtype=np.float64) - np.asarray(self.intrinsics))
        if diff.max() > tol_px:
            raise CalibrationMismatchError(
                f"camera intrinsics {np.round(intrinsics, 2).tolist()} differ from the "
                f"calibrated {np.round(self.intrinsics, 2).tolist()} by up to {diff.max():.2f} px "
                "(another camera, or its factory calibration changed): recalibrate"
            )

    # ------------------------------------------------------------------ files

    def filename(self) -> str:
        serial = re.sub(r"[^A-Za-z0-9_-]", "-", self.camera_serial or "camera")
        return f"{self.kind}_{serial}_{self.created_at.astimezone(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"

    def to_dict(self) -> dict[str, Any]:
        fx, fy, cx, cy = self.intrinsics
        ref = "T_base_cam" if self.kind == "eye_to_hand" else "T_eef_cam"
        return {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "created_at": self.created_at.astimezone(dt.timezone.utc).isoformat(),
            "camera": {
                "serial": self.camera_serial,
                "name": self.camera_name,
                "intrinsics": {
                    "fx": fx,
                    "fy": fy,
                    "cx": cx,
                    "cy": cy,
                    "width": self.image_size[0],
                    "height": self.image_size[1],
                },
                "distortion": self.distortion,
                "depth_scale": self.depth_scale,
            },
            ref: self.T_ref_cam.tolist(),
            "robot": self.robot,
            "board": self.board,
            "quality": self.quality,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "calibration") -> CameraCalibration:
        if d.get("format") != FORMAT:
            raise ValueError(f"{source}: not a {FORMAT} file (format={d.get('format')!r})")
        if d.get("version") != VERSION:
            raise ValueError(f"{source}: version {d.get('version')} is not {VERSION}")
        try:
            kind = d["kind"]
            ref = "T_base_cam" if kind == "eye_to_hand" else "T_eef_cam"
            cam = d["camera"]
            intr = cam["intrinsics"]
            created = dt.datetime.fromisoformat(d["created_at"])
            return cls(
                kind=kind,
                camera_serial=str(cam["serial"]),
                camera_name=str(cam.get("name", "")),
                intrinsics=(intr["fx"], intr["fy"], intr["cx"], intr["cy"]),
                image_size=(intr["width"], intr["height"]),
                T_ref_cam=np.asarray(d[ref], dtype=np.float64),
                created_at=created,
                depth_scale=cam.get("depth_scale"),
                distortion=cam.get("distortion", {"model": "none", "coeffs": []}),
                robot=d.get("robot", ""),
                board=d.get("board", {}),
                quality=d.get("quality", {}),
                notes=d.get("notes", ""),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing key {e}") from None

    def save(self, directory: str | Path) -> Path:
        """Write atomically into ``directory`` under `filename()`; returns the path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.filename()
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def read_calibration(path: str | Path) -> CameraCalibration:
    """One calibration file, without any check of age or camera."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return CameraCalibration.from_dict(d, source=str(path))


def load_calibration(
    path: str | Path,
    *,
    serial: str | None = None,
    kind: str | None = None,
    max_age_days: float | None = DEFAULT_MAX_AGE_DAYS,
    now: dt.datetime | None = None,
) -> CameraCalibration:
    """The calibration in a file, or the newest one in a directory that matches ``serial``
    and ``kind``; raises StaleCalibrationError past ``max_age_days`` (None: no limit),
    CalibrationMismatchError for another camera or kind, FileNotFoundError if none."""
    path = Path(path)
    if path.is_dir():
        found = []
        for p in sorted(path.glob("*.json")):
            try:
                c = read_calibration(p)
            except ValueError:
                continue  # other JSON files may live there
            if (serial is None or c.camera_serial == serial) and (kind is None or c.kind == kind):
                found.append((c.created_at, p, c))
        if not found:
            what = " ".join(x for x in (kind, f"camera {serial}" if serial else None) if x)
            raise FileNotFoundError(
                f"no {what + ' ' if what else ''}calibration in {path}; run `mu0 calibrate`"
            )
        _, path, calib = max(found, key=lambda x: x[0])
    elif path.is_file():
        calib = read_calibration(path)
    else:
        raise FileNotFoundError(f"no calibration file or directory at {path}")
    if serial is not None and calib.camera_serial != serial:
        raise CalibrationMismatchError(
            f"{path} is for camera {calib.camera_serial}, expected {serial}"
        )
    if kind is not None and calib.kind != kind:
        raise CalibrationMismatchError(f"{path} is an {calib.kind} calibration, expected {kind}")
    if max_age_days is not None:
        calib.check_fresh(max_age_days, now)
    return calib
