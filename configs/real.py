"""Real-robot set-ups for `mu0 run-real` and `mu0 calibrate`: one YAML file per set-up
(``configs/real/<setup>.yaml``), read into frozen dataclasses.

Loading is strict: an unknown key is an error that names the nearest known one, and a
missing required key is named. Relative paths in a set-up are relative to the directory
`mu0` runs in. YAML is read with ``yaml.safe_load``: plain data only, nothing executed.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from envs.arm import SafetyConfig


@dataclass(frozen=True)
class CameraSection:
    serial: str | None = None
    width: int = 640
    height: int = 480
    fps: int = 30
    recording: str | None = None  # replayed by --dry-run
    real_time: bool = True


@dataclass(frozen=True)
class CalibrationSection:
    path: str = "calibration"  # a calibration file, or a directory (newest for the camera)
    max_age_days: float = 30.0
    tolerance_px: float = 1.0  # intrinsics may differ from the calibrated ones by this much


@dataclass(frozen=True)
class ServerSection:
    address: str = "tcp://127.0.0.1:5555"
    server_public_key: str | None = None  # CURVE: the server's public key file
    client_secret_key: str | None = None  # CURVE: this robot's secret key file
    timeout_s: float = 2.0
    max_trace_age_s: float = 0.5  # never act on a trace older than this (capture to now)
    send_max_side: int | None = None  # downscale images before sending (None: as captured)


@dataclass(frozen=True)
class ExpertSection:
    path: str | None = None  # an action-expert checkpoint directory (policies.load_expert)
    device: str = "cpu"
    # A stand-in that needs no checkpoint: "follow-gripper-trace" moves the gripper along
    # μ0's forecast for it. For dry runs and bring-up, not for tasks.
    builtin: str | None = None
    seed: int | None = 0

    def __post_init__(self) -> None:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("expert: give exactly one of 'path' or 'builtin'")
        if self.builtin not in (None, "follow-gripper-trace"):
            raise ValueError(f"expert.builtin {self.builtin!r} unknown; use follow-gripper-trace")


@dataclass(frozen=True)
class QuerySection:
    scene_points: int = 32  # query points picked in the image, besides the gripper's


@dataclass(frozen=True)
class ArmSection:
    backend: str = "ur"  # ur | sim
    host: str | None = None
    frequency: float = 500.0
    lookahead_s: float = 0.1
    gain: float = 300.0
    gripper: str | None = None  # robotiq | None
    num_joints: int = 6
    # The expert's base frame is the simulated robot's; a real controller may report a
    # base turned about z (UR's "base" vs "base_link": 180°). Poses and traces are turned
    # into the expert's frame by this angle, and its actions back.
    expert_frame_yaw_deg: float = 0.0

    def __post_init__(self) -> None:
        if self.backend not in ("ur", "sim"):
            raise ValueError(f"arm.backend must be 'ur' or 'sim', got {self.backend!r}")
        if self.backend == "ur" and not self.host:
            raise ValueError("arm.host is required for the ur backend")
        if self.gripper not in (None, "robotiq"):
            raise ValueError(f"arm.gripper must be robotiq or null, got {self.gripper!r}")


@dataclass(frozen=True)
class ProprioSection:
    """How the arm's state fills the expert's proprio vector (the simulated robot's
    layout): eef_pos_base[3], eef_quat_base_xyzw[4], gripper_qpos[G], joint_pos[J]. The
    gripper's [0, 1] reading is mapped linearly between the simulated gripper's joint
    values when open and when closed."""

    gripper_open: tuple[float, ...] = (0.04, -0.04)
    gripper_closed: tuple[float, ...] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if len(self.gripper_open) != len(self.gripper_closed):
            raise ValueError("proprio.gripper_open and gripper_closed must have equal lengths")


@dataclass(frozen=True)
class ActionSection:
    """The env convention: an action of 1 moves 5 cm or turns 0.5 rad in one step."""

    pos_scale_m: float = 0.05
    rot_scale_rad: float = 0.5


@dataclass(frozen=True)
class DryRunSection:
    # The virtual arm's start: x, y, z (m) and a rotation vector (rad), in the base frame.
    start_eef_pose: tuple[float, ...] = (0.5, 0.0, 0.3, 3.14159265, 0.0, 0.0)
    start_gripper: float = 0.0


@dataclass(frozen=True)
class RealSetup:
    name: str
    instruction: str
    rate_hz: float = 10.0
    camera: CameraSection = field(default_factory=CameraSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    server: ServerSection = field(default_factory=ServerSection)
    expert: ExpertSection = field(
        default_factory=lambda: ExpertSection(builtin="follow-gripper-trace")
    )
    queries: QuerySection = field(default_factory=QuerySection)
    # No arm section: a virtual arm (nothing moves); a robot needs its backend named.
    arm: ArmSection = field(default_factory=lambda: ArmSection(backend="sim"))
    proprio: ProprioSection = field(default_factory=ProprioSection)
    action: ActionSection = field(default_factory=ActionSection)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    dry_run: DryRunSection = field(default_factory=DryRunSection)

    def __post_init__(self) -> None:
        if not self.rate_hz > 0:
            raise ValueError(f"rate_hz must be positive, got {self.rate_hz}")


_SECTIONS = {
    "camera": CameraSection,
    "calibration": CalibrationSection,
    "server": ServerSection,
    "expert": ExpertSection,
    "queries": QuerySection,
    "arm": ArmSection,
    "proprio": ProprioSection,
    "action": ActionSection,
    "safety": SafetyConfig,
    "dry_run": DryRunSection,
}


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"{where}: unknown key {key!r}{hint}; known: {', '.join(fields)}")
    kwargs = {}
    for key, value in data.items():
        if isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def setup_from_dict(data: dict[str, Any], source: str = "config") -> RealSetup:
    if not isinstance(data, dict):
        raise ValueError(f"{source}: the top level must be a mapping")
    top = {k: v for k, v in data.items() if k not in _SECTIONS}
    for required in ("name", "instruction"):
        if required not in data:
            raise ValueError(f"{source}: missing required key {required!r}")
    kwargs = {}
    for key, cls in _SECTIONS.items():
        if key in data:
            try:
                kwargs[key] = _build(cls, data[key], f"{source}: {key}")
            except ValueError as e:
                msg = str(e)
                raise ValueError(
                    msg if msg.startswith(source) else f"{source}: {key}: {msg}"
                ) from None
    fields = {f.name for f in dataclasses.fields(RealSetup)} - set(_SECTIONS)
    unknown = [k for k in top if k not in fields]
    if unknown:
        near = difflib.get_close_matches(str(unknown[0]), sorted(fields | set(_SECTIONS)), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"{source}: unknown key {unknown[0]!r}{hint}")
    return RealSetup(**top, **kwargs)


def load_real_setup(path: str | Path) -> RealSetup:
    """Read ``configs/real/<setup>.yaml`` (or any path) into a RealSetup."""
    path = Path(path)
    if not path.is_file():
        here = Path(__file__).parent / "real"
        known = sorted(p.name for p in here.glob("*.yaml"))
        raise FileNotFoundError(f"no set-up file {path}; shipped examples: {known}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    return setup_from_dict(data, source=str(path))
