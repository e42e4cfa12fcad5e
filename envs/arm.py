"""Robot arms: a small interface, a safety layer around it, and a kinematic simulated arm.

`Arm` is what a backend implements (UR through ur_rtde in `envs.ur_arm`; `SimArm` here):

    connect() / disconnect()               open and release the controller
    read_state() -> ArmState               end-effector pose in the base, joints, gripper
    command_eef(T_base_eef, gripper)       servo the end effector towards a target
    command_joints(q, gripper)             servo the joints towards a target
    stop()                                 decelerate and hold still

`SafeArm` wraps any `Arm` and is the only thing the runtime commands. Every command goes
through, in order: the emergency-stop latch; a staleness check (a command made from data
older than ``max_command_age_s`` holds the arm instead); the workspace box (targets are
clipped into it, and a measured pose far outside it stops everything); velocity and
acceleration limits (the target is moved no further than the limits allow since the last
command); gripper limits. A watchdog holds the arm when commands stop coming.

Units: metres, radians, seconds; poses are float64[4, 4] ``T_base_eef`` (DESIGN.md).
The gripper is a number in [0, 1]: 0 open, 1 closed (env actions' -1/+1 map onto it).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from calibration.transforms import (
    make_T,
    matrix_to_quat_xyzw,
    matrix_to_rotvec,
    rotvec_to_matrix,
)

log = logging.getLogger("mu0.arm")


@dataclass(frozen=True)
class ArmState:
    """One reading of the arm. ``timestamp``: time.monotonic() when it was read."""

    T_base_eef: np.ndarray  # float64[4, 4]
    joint_pos: np.ndarray  # float64[J] radians
    gripper: float  # 0 open .. 1 closed
    timestamp: float

    @property
    def eef_pos(self) -> np.ndarray:
        return self.T_base_eef[:3, 3].copy()

    def eef_quat_xyzw(self) -> np.ndarray:
        return matrix_to_quat_xyzw(self.T_base_eef[:3, :3])


class Arm(ABC):
    """A robot arm backend. Implementations need not be thread-safe: `SafeArm` serialises
    every call with a lock."""

    name: str = "arm"
    num_joints: int = 0

    @abstractmethod
    def connect(self) -> None: ...

    @abstractmethod
    def disconnect(self) -> None: ...

    @abstractmethod
    def read_state(self) -> ArmState: ...

    @abstractmethod
    def command_eef(self, T_base_eef: np.ndarray, gripper: float | None = None) -> None:
        """Servo towards ``T_base_eef``; ``gripper`` in [0, 1] or None to leave it."""

    @abstractmethod
    def command_joints(self, q: np.ndarray, gripper: float | None = None) -> None: ...

    @abstractmethod
    def stop(self) -> None:
        """Decelerate to rest and hold (not an emergency stop)."""

    def emergency_stop(self) -> None:
        """Stop as hard as the controller allows; backends with a protective stop use it."""
        self.stop()

    def __enter__(self) -> Arm:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()


# --------------------------------------------------------------------------- safety


@dataclass(frozen=True)
class SafetyConfig:
    """Limits `SafeArm` enforces. Defaults suit a tabletop arm working slowly near people;
    set the workspace box for your table before anything else."""

    workspace_min: tuple[float, float, float] = (0.2, -0.4, 0.02)
    workspace_max: tuple[float, float, float] = (0.8, 0.4, 0.5)
    # A measured pose this far outside the box means something is wrong: emergency stop.
    workspace_margin_m: float = 0.05
    max_linear_speed: float = 0.25  # m/s
    max_angular_speed: float = 1.0  # rad/s
    max_linear_accel: float = 1.0  # m/s^2
    max_angular_accel: float = 4.0  # rad/s^2
    max_joint_speed: float = 1.0  # rad/s, per joint
    max_joint_accel: float = 4.0  # rad/s^2, per joint
    joint_min: tuple[float, ...] | None = None
    joint_max: tuple[float, ...] | None = None
    gripper_min: float = 0.0
    gripper_max: float = 1.0
    max_command_age_s: float = 0.5  # commands made from older data hold the arm
    watchdog_s: float = 0.5  # no command for this long: hold
    # The rate limiter assumes at least this long between commands (a burst of commands
    # must not add up to a jump) and at most this long (after a pause, start from rest).
    min_dt_s: float = 0.002
    max_dt_s: float = 0.2
    # The control loop's period: the time the first command after a rest is given.
    command_period_s: float = 0.05

    def __post_init__(self) -> None:
        lo, hi = np.asarray(self.workspace_min), np.asarray(self.workspace_max)
        if lo.shape != (3,) or hi.shape != (3,) or np.any(lo >= hi):
            raise ValueError(f"workspace_min {lo} must be below workspace_max {hi} on every axis")
        for name in (
            "max_linear_speed",
            "max_angular_speed",
            "max_linear_accel",
            "max_angular_accel",
            "max_joint_speed",
            "max_joint_accel",
            "max_command_age_s",
            "watchdog_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.gripper_min <= self.gripper_max <= 1.0:
            raise ValueError("need 0 <= gripper_min <= gripper_max <= 1")


class EmergencyStop(RuntimeError):
    """The arm is emergency-stopped; nothing moves until `SafeArm.reset_emergency_stop()`."""


@dataclass
class CommandReport:
    """What the safety layer did to one command."""

    sent: bool  # something reached the arm (False when held)
    held: str | None = None  # why the arm was held instead
    clipped_workspace: bool = False
    limited_speed: bool = False
    limited_accel: bool = False
    clipped_gripper: bool = False
    T_sent: np.ndarray | None = None


@dataclass
class SafetyCounts:
    commands: int = 0
    sent: int = 0
    holds: int = 0
    stale: int = 0
    clipped_workspace: int = 0
    limited_speed: int = 0
    limited_accel: int = 0
    clipped_gripper: int = 0
    watchdog: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class SafeArm:
    """An `Arm` behind the limits of a `SafetyConfig` (see the module docstring).

    ``clock`` (default time.monotonic) is injectable so tests can step time. The watchdog
    thread starts with `connect()` unless ``watchdog=False``; `check_watchdog()` runs one
    check by hand.
    """

    def __init__(
        self,
        arm: Arm,
        config: SafetyConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        watchdog: bool = True,
    ) -> None:
        self.arm = arm
        self.config = config or SafetyConfig()
        self.clock = clock
        self.counts = SafetyCounts()
        self._use_watchdog = watchdog
        self._lock = threading.RLock()
        self._estop_reason: str | None = None
        self._holding = True
        self._last_T: np.ndarray | None = None  # last target sent
        self._last_v = np.zeros(3)  # its linear velocity, m/s
        self._last_w = np.zeros(3)  # its angular velocity, rad/s
        self._last_q: np.ndarray | None = None
        self._last_qd: np.ndarray | None = None
        self._last_time = -np.inf
        self._last_gripper: float | None = None
        self._stop_watchdog = threading.Event()
        self._watchdog_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> SafeArm:
        with self._lock:
            self.arm.connect()
            state = self.read_state()
            self._restart_from(state)
        if self._use_watchdog and self._watchdog_thread is None:
            self._stop_watchdog.clear()
            self._watchdog_thread = threading.Thread(
                target=self._watchdog_loop, name="arm-watchdog", daemon=True
            )
            self._watchdog_thread.start()
        return self

    def disconnect(self) -> None:
        self._stop_watchdog.set()
        if self._watchdog_thread is not None:
            self._watchdog_thread.join(timeout=2.0)
            self._watchdog_thread = None
        with self._lock:
            try:
                if self._estop_reason is None:
                    self.arm.stop()
            finally:
                self.arm.disconnect()

    def __enter__(self) -> SafeArm:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.disconnect()

    # ------------------------------------------------------------------ state

    @property
    def emergency_stopped(self) -> str | None:
        """The reason of a latched emergency stop, or None."""
        return self._estop_reason

    @property
    def holding(self) -> bool:
        return self._holding

    def read_state(self) -> ArmState:
        """The arm's state; a pose far outside the workspace triggers an emergency stop."""
        with self._lock:
            state = self.arm.read_state()
            cfg = self.config
            p = state.T_base_eef[:3, 3]
            lo = np.asarray(cfg.workspace_min) - cfg.workspace_margin_m
            hi = np.asarray(cfg.workspace_max) + cfg.workspace_margin_m
            if self._estop_reason is None and (np.any(p < lo) or np.any(p > hi)):
                self.emergency_stop(
                    f"end effector measured at {np.round(p, 3).tolist()} m, outside the "
                    f"workspace {list(cfg.workspace_min)}..{list(cfg.workspace_max)} "
                    f"(+{cfg.workspace_margin_m} m): move it inside or widen the box"
                )
            return state

    # ------------------------------------------------------------------ commands

    def command_eef(
        self, T_base_eef: np.ndarray, gripper: float | None = None, stamp: float | None = None
    ) -> CommandReport:
        """Send an end-effector target through the limits. ``stamp``: time.monotonic() of
        the data the target was computed from (camera frame, trace); too old -> hold."""
        with self._lock:
            self._check_estop()
            cfg = self.config
            now = self.clock()
            self.counts.commands += 1
            if stamp is not None and now - stamp > cfg.max_command_age_s:
                self.counts.stale += 1
                return self.hold(f"stale command ({now - stamp:.3f} s old)")
            T_target = np.asarray(T_base_eef, dtype=np.float64)
            if T_target.shape != (4, 4) or not np.all(np.isfinite(T_target)):
                return self.hold("non-finite or malformed target")
            report = CommandReport(sent=True)
            # Workspace box.
            p = T_target[:3, 3]
            p_box = np.clip(p, cfg.workspace_min, cfg.workspace_max)
            report.clipped_workspace = bool(np.any(p_box != p))
            # Velocity and acceleration, from the last target (or the measured pose).
            if self._holding or self._last_T is None:
                self._restart_from(self.arm.read_state(), now - cfg.command_period_s)
            dt = float(np.clip(now - self._last_time, cfg.min_dt_s, cfg.max_dt_s))
            p_prev, R_prev = self._last_T[:3, 3], self._last_T[:3, :3]
            v, sl, al = _limit(
                p_box - p_prev, self._last_v, cfg.max_linear_speed, cfg.max_linear_accel, dt
            )
            w, sw, aw = _limit(
                matrix_to_rotvec(T_target[:3, :3] @ R_prev.T),
                self._last_w,
                cfg.max_angular_speed,
                cfg.max_angular_accel,
                dt,
            )
            report.limited_speed, report.limited_accel = sl or sw, al or aw
            # The box is a hard limit, even where braking within the acceleration limit
            # would carry the target past it.
            p_send = np.clip(p_prev + v * dt, cfg.workspace_min, cfg.workspace_max)
            T_send = make_T(rotvec_to_matrix(w * dt) @ R_prev, p_send)
            g = self._gripper(gripper, report)
            self.arm.command_eef(T_send, g)
            self._last_T, self._last_v, self._last_w = T_send, v, w
            self._last_time = now
            self._holding = False
            self._count(report)
            report.T_sent = T_send
            return report

    def command_joints(
        self, q: np.ndarray, gripper: float | None = None, stamp: float | None = None
    ) -> CommandReport:
        """Send joint targets through joint limits and per-joint speed/acceleration limits.
        The workspace box is checked on the arm's measured pose (`read_state`)."""
        with self._lock:
            self._check_estop()
            cfg = self.config
            now = self.clock()
            self.counts.commands += 1
            if stamp is not None and now - stamp > cfg.max_command_age_s:
                self.counts.stale += 1
                return self.hold(f"stale command ({now - stamp:.3f} s old)")
            q = np.asarray(q, dtype=np.float64)
            if q.ndim != 1 or not np.all(np.isfinite(q)):
                return self.hold("non-finite or malformed joint target")
            report = CommandReport(sent=True)
            if self._holding or self._last_q is None:
                self._restart_from(self.arm.read_state(), now - cfg.command_period_s)
            if q.shape != self._last_q.shape:
                return self.hold(f"joint target has {q.size} joints, the arm {self._last_q.size}")
            if cfg.joint_min is not None and cfg.joint_max is not None:
                q_lim = np.clip(q, cfg.joint_min, cfg.joint_max)
                report.clipped_workspace = bool(np.any(q_lim != q))
                q = q_lim
            dt = float(np.clip(now - self._last_time, cfg.min_dt_s, cfg.max_dt_s))
            qd_des = (q - self._last_q) / dt
            qd = np.clip(qd_des, -cfg.max_joint_speed, cfg.max_joint_speed)
            report.limited_speed = bool(np.any(qd != qd_des))
            dq = np.clip(qd - self._last_qd, -cfg.max_joint_accel * dt, cfg.max_joint_accel * dt)
            report.limited_accel = bool(np.any(self._last_qd + dq != qd))
            qd = self._last_qd + dq
            q_send = self._last_q + qd * dt
            g = self._gripper(gripper, report)
            self.arm.command_joints(q_send, g)
            self._last_q, self._last_qd, self._last_time = q_send, qd, now
            self._holding = False
            self._count(report)
            return report

    def hold(self, reason: str) -> CommandReport:
        """Stop the arm where it is (decelerating) and remember why."""
        with self._lock:
            self._check_estop()
            self.counts.holds += 1
            self.counts.reasons[reason.split(" (")[0]] = (
                self.counts.reasons.get(reason.split(" (")[0], 0) + 1
            )
            if not self._holding:
                log.info("holding: %s", reason)
                self.arm.stop()
            self._holding = True
            self._last_v[:] = 0.0
            self._last_w[:] = 0.0
            return CommandReport(sent=False, held=reason)

    def emergency_stop(self, reason: str = "emergency stop requested") -> None:
        """Latch an emergency stop: the arm stops at once and every later command raises
        EmergencyStop until `reset_emergency_stop()`."""
        with self._lock:
            if self._estop_reason is None:
                log.error("EMERGENCY STOP: %s", reason)
                self._estop_reason = reason
            self._holding = True
            try:
                self.arm.emergency_stop()
            except Exception:  # noqa: BLE001 - the latch must hold even if the call fails
                log.exception("emergency stop call to the arm failed")

    def reset_emergency_stop(self) -> None:
        """Clear the latch (after a person has checked the cell); motion restarts from rest
        at the measured pose."""
        with self._lock:
            self._estop_reason = None
            self._restart_from(self.arm.read_state())

    def check_watchdog(self) -> bool:
        """Hold if no command came for ``watchdog_s``; True if it did."""
        with self._lock:
            if self._holding or self._estop_reason is not None:
                return False
            idle = self.clock() - self._last_time
            if idle > self.config.watchdog_s:
                self.counts.watchdog += 1
                self.hold(f"watchdog: no command for {idle:.2f} s")
                return True
            return False

    # ------------------------------------------------------------------ internals

    def _watchdog_loop(self) -> None:
        period = self.config.watchdog_s / 4
        while not self._stop_watchdog.wait(period):
            try:
                self.check_watchdog()
            except Exception:  # noqa: BLE001 - keep watching
                log.exception("watchdog check failed")

    def _check_estop(self) -> None:
        if self._estop_reason is not None:
            raise EmergencyStop(self._estop_reason)

    def _restart_from(self, state: ArmState, at: float | None = None) -> None:
        """Rate limiting restarts at rest from the measured state (as if commanded ``at``)."""
        self._last_T = np.asarray(state.T_base_eef, dtype=np.float64).copy()
        self._last_v = np.zeros(3)
        self._last_w = np.zeros(3)
        self._last_q = np.asarray(state.joint_pos, dtype=np.float64).copy()
        self._last_qd = np.zeros_like(self._last_q)
        self._last_time = self.clock() if at is None else at
        if self._last_gripper is None:
            self._last_gripper = float(state.gripper)

    def _gripper(self, gripper: float | None, report: CommandReport) -> float | None:
        if gripper is None:
            return None
        cfg = self.config
        g = float(np.clip(gripper, cfg.gripper_min, cfg.gripper_max))
        report.clipped_gripper = g != gripper
        self._last_gripper = g
        return g

    def _count(self, report: CommandReport) -> None:
        c = self.counts
        c.sent += 1
        c.clipped_workspace += report.clipped_workspace
        c.limited_speed += report.limited_speed
        c.limited_accel += report.limited_accel
        c.clipped_gripper += report.clipped_gripper


def _limit(
    delta: np.ndarray, v_prev: np.ndarray, v_max: float, a_max: float, dt: float
) -> tuple[np.ndarray, bool, bool]:
    """The velocity for covering ``delta`` (a displacement or rotation vector) this step,
    limited to |v| <= v_max and |v - v_prev| <= a_max dt, and no faster than lets it stop
    at the target within a_max (so it does not overshoot); also whether each limit bit."""
    v = delta / dt
    distance = float(np.linalg.norm(delta))
    # Braking: from speed s, stopping takes s^2 / (2 a); one step of lag is allowed for.
    brake = float(np.sqrt(2.0 * a_max * distance + (a_max * dt) ** 2) - a_max * dt)
    speed = float(np.linalg.norm(v))
    cap = min(v_max, max(brake, distance / dt if distance <= a_max * dt * dt else 0.0))
    speed_limited = speed > v_max
    if speed > cap:
        v = v * (cap / speed)
    dv = v - v_prev
    dv_norm = float(np.linalg.norm(dv))
    accel_limited = dv_norm > a_max * dt * (1 + 1e-9)
    if accel_limited:
        v = v_prev + dv * (a_max * dt / dv_norm)
    return v, speed_limited, accel_limited


# --------------------------------------------------------------------------- simulated arm


class SimArm(Arm):
    """A kinematic arm: the end effector follows commands, limited only by ``tracking``.

    ``tracking`` in (0, 1]: the fraction of the way to the last target covered on each
    `read_state` (1: reaches it at once). Joints, when no kinematics are given, follow
    `command_joints` directly and stay put under `command_eef`. Records what it was told
    (``commands``, ``stops``, ``estops``) for tests and dry runs; ``clock`` stamps states.
    """

    name = "sim"

    def __init__(
        self,
        T_base_eef: np.ndarray | None = None,
        num_joints: int = 7,
        gripper: float = 0.0,
        tracking: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.num_joints = num_joints
        self._T = (
            make_T(np.diag([1.0, -1.0, -1.0]), [0.5, 0.0, 0.3])
            if T_base_eef is None
            else np.asarray(T_base_eef, dtype=np.float64).copy()
        )
        self._q = np.zeros(num_joints)
        self._gripper = float(gripper)
        self._target: np.ndarray | None = None
        self.tracking = tracking
        self.clock = clock
        self.connected = False
        self.commands: list[tuple[str, np.ndarray, float | None]] = []
        self.stops = 0
        self.estops = 0

    def connect(self) -> None:
        self.connected = True

    def disconnect(self) -> None:
        self.connected = False

    def _require(self) -> None:
        if not self.connected:
            raise RuntimeError("SimArm is not connected")

    def read_state(self) -> ArmState:
        self._require()
        if self._target is not None:
            a = self.tracking
            p = (1 - a) * self._T[:3, 3] + a * self._target[:3, 3]
            dR = matrix_to_rotvec(self._target[:3, :3] @ self._T[:3, :3].T)
            self._T = make_T(rotvec_to_matrix(a * dR) @ self._T[:3, :3], p)
        return ArmState(self._T.copy(), self._q.copy(), self._gripper, self.clock())

    def command_eef(self, T_base_eef: np.ndarray, gripper: float | None = None) -> None:
        self._require()
        self._target = np.asarray(T_base_eef, dtype=np.float64).copy()
        if gripper is not None:
            self._gripper = float(gripper)
        self.commands.append(("eef", self._target.copy(), gripper))

    def command_joints(self, q: np.ndarray, gripper: float | None = None) -> None:
        self._require()
        self._q = np.asarray(q, dtype=np.float64).copy()
        if gripper is not None:
            self._gripper = float(gripper)
        self.commands.append(("joints", self._q.copy(), gripper))

    def stop(self) -> None:
        self._require()
        self._target = None
        self.stops += 1

    def emergency_stop(self) -> None:
        self._target = None
        self.estops += 1


class ManualClock:
    """A clock for tests: time moves only when told."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t


def safety_config_from_dict(d: dict) -> SafetyConfig:
    """A SafetyConfig from a mapping (YAML), rejecting unknown keys by name."""
    known = set(SafetyConfig.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown safety keys {sorted(unknown)}; known: {sorted(known)}")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return replace(SafetyConfig(), **converted)
