"""The real-robot loop behind `mu0 run-real`: camera, calibration, trace client, action
expert and arm at a fixed rate.

Every tick (``rate_hz``, on an absolute schedule; a late tick is skipped, not squeezed):

1. read the arm's state and keep it in a short history (time-stamped poses);
2. if the camera has a new frame, look up the end-effector pose *at the frame's capture
   time* in that history (a wrist camera's pose, the gripper query's position), build the
   query observation and hand it to the trace client's stream (newest wins; the loop never
   waits for the server);
3. when the action queue runs down to ``chunk - execute``, take the newest trace younger
   than ``max_trace_age_s`` (age counts from the camera's capture time), put it in the
   base frame with the calibration as it was at capture, and ask the expert for a chunk;
4. latency compensation: the chunk answers the scene at capture time, so its delta
   actions are integrated from the end-effector pose at capture into absolute targets,
   the i-th meant for ``t_capture + (i + 1) / rate_hz``; targets whose time has passed
   when the chunk arrives are dropped, the next one due is commanded;
5. command the target through `envs.arm.SafeArm` (workspace, speed, acceleration and
   gripper limits; stale-command hold); with no fresh trace or nothing due, hold.

A dry run replays a recorded camera stream, runs the server, expert and safety layer on
it, and commands a virtual arm (`envs.arm.SimArm`) instead of a robot: what the robot
would have been told, with every timing, without moving anything.

Every tick can be logged as one JSON line; `RunSummary` gathers the figures.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.transforms import (
    make_T,
    matrix_to_quat_xyzw,
    matrix_to_rotvec,
    rotvec_to_matrix,
)

log = logging.getLogger("mu0.real")


# --------------------------------------------------------------------------- pieces


class PoseHistory:
    """Recent end-effector poses with their times; the pose at any time in between."""

    def __init__(self, maxlen: int = 256) -> None:
        self._t: deque[float] = deque(maxlen=maxlen)
        self._T: deque[np.ndarray] = deque(maxlen=maxlen)
        self._extra: deque[Any] = deque(maxlen=maxlen)

    def add(self, t: float, T_base_eef: np.ndarray, extra: Any = None) -> None:
        if self._t and t < self._t[-1]:
            raise ValueError("poses must be added in time order")
        self._t.append(float(t))
        self._T.append(np.asarray(T_base_eef, dtype=np.float64))
        self._extra.append(extra)

    def __len__(self) -> int:
        return len(self._t)

    def at(self, t: float) -> np.ndarray:
        """The pose at time ``t``: linear in position, geodesic in rotation between the two
        readings around it; the first or last reading outside the recorded span."""
        if not self._t:
            raise ValueError("no poses recorded yet")
        ts = np.asarray(self._t)
        i = int(np.searchsorted(ts, t))
        if i == 0:
            return self._T[0].copy()
        if i >= len(ts):
            return self._T[-1].copy()
        t0, t1 = ts[i - 1], ts[i]
        a = 0.0 if t1 <= t0 else (t - t0) / (t1 - t0)
        T0, T1 = self._T[i - 1], self._T[i]
        p = (1 - a) * T0[:3, 3] + a * T1[:3, 3]
        R = rotvec_to_matrix(a * matrix_to_rotvec(T1[:3, :3] @ T0[:3, :3].T)) @ T0[:3, :3]
        return make_T(R, p)

    def nearest_extra(self, t: float) -> Any:
        """The extra data recorded nearest to time ``t``."""
        ts = np.asarray(self._t)
        return self._extra[int(np.argmin(np.abs(ts - t)))]


def rot_z(deg: float) -> np.ndarray:
    """float64[4, 4]: a rotation about z by ``deg`` degrees."""
    return make_T(rotvec_to_matrix([0.0, 0.0, np.deg2rad(deg)]), np.zeros(3))


def delta_actions_to_targets(
    T_start: np.ndarray,
    actions: np.ndarray,
    pos_scale_m: float = 0.05,
    rot_scale_rad: float = 0.5,
    R_arm_expert: np.ndarray | None = None,
) -> list[tuple[np.ndarray, float]]:
    """Env-convention delta actions float32[K, 7] -> absolute (T_base_eef, gripper[0, 1]).

    Each action moves the previous target by (dx, dy, dz) × ``pos_scale_m`` and turns it by
    the rotation vector (dax, day, daz) × ``rot_scale_rad``, both in the base frame (the
    turn applied on the left, as robosuite's OSC_POSE does); the gripper's -1 (open) .. +1
    (closed) becomes 0 .. 1. ``R_arm_expert`` turns the expert's base-frame vectors into
    the arm's when the two base frames differ (`ArmSection.expert_frame_yaw_deg`).
    """
    actions = np.asarray(actions, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[1] != 7:
        raise ValueError(f"actions must be [K, 7], got {list(actions.shape)}")
    R_ae = np.eye(3) if R_arm_expert is None else np.asarray(R_arm_expert, dtype=np.float64)
    out = []
    T = np.asarray(T_start, dtype=np.float64)
    for a in np.clip(actions, -1.0, 1.0):
        p = T[:3, 3] + R_ae @ a[:3] * pos_scale_m
        R = rotvec_to_matrix(R_ae @ a[3:6] * rot_scale_rad) @ T[:3, :3]
        T = make_T(R, p)
        out.append((T, float((a[6] + 1.0) / 2.0)))
    return out


def prepare_images(
    rgb: np.ndarray,
    depth_m: np.ndarray,
    intrinsics: np.ndarray,
    size_wh: tuple[int, int] | None = None,
    max_side: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resize an RGB-D frame for the server (a size it requires, or a longest side) and
    scale the intrinsics with it (pixel centres stay centres: c' = (c + 0.5) s - 0.5).
    Depth is resized by nearest neighbour: averaging across an edge invents surfaces."""
    H, W = depth_m.shape
    if size_wh is None and max_side is not None and max(W, H) > max_side:
        s = max_side / max(W, H)
        size_wh = (round(W * s), round(H * s))
    if size_wh is None or tuple(size_wh) == (W, H):
        return rgb, depth_m, np.asarray(intrinsics, np.float32)
    from calibration.board import import_cv2

    cv2 = import_cv2()
    w, h = int(size_wh[0]), int(size_wh[1])
    sx, sy = w / W, h / H
    rgb_r = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
    depth_r = cv2.resize(depth_m, (w, h), interpolation=cv2.INTER_NEAREST)
    fx, fy, cx, cy = (float(x) for x in intrinsics)
    K = np.array([fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5], np.float32)
    return rgb_r, depth_r, K


def make_proprio(
    T_base_eef: np.ndarray,
    gripper: float,
    joint_pos: np.ndarray,
    gripper_open: tuple[float, ...],
    gripper_closed: tuple[float, ...],
) -> np.ndarray:
    """float32[D] in the environments' layout: eef_pos_base[3], eef_quat_base_xyzw[4],
    gripper_qpos[G] (interpolated open → closed), joint_pos[J]."""
    g_open, g_closed = np.asarray(gripper_open), np.asarray(gripper_closed)
    g = float(np.clip(gripper, 0.0, 1.0))
    return np.concatenate(
        [
            T_base_eef[:3, 3],
            matrix_to_quat_xyzw(T_base_eef[:3, :3]),
            (1 - g) * g_open + g * g_closed,
            np.asarray(joint_pos, dtype=np.float64),
        ]
    ).astype(np.float32)


class FollowGripperTrace:
    """A stand-in expert: moves the gripper along μ0's forecast for the gripper query
    (point 0) and keeps the gripper open. Same interface as `policies.ActionExpert`.

    For bring-up and dry runs (it shows that traces, frames and the arm agree); it solves
    no task.
    """

    embodiment = "follow-gripper-trace"

    def __init__(
        self, chunk: int = 8, execute: int = 4, stride: int = 2, pos_scale_m: float = 0.05
    ):
        self.chunk, self.execute, self.stride, self.pos_scale_m = (
            chunk,
            execute,
            stride,
            pos_scale_m,
        )

    def act(self, obs: Any) -> np.ndarray:
        actions = np.zeros((self.chunk, 7), np.float32)
        actions[:, 6] = -1.0  # open
        if not getattr(obs, "traces_available", True) or not bool(obs.trace_valid[0]):
            return actions
        trace = np.asarray(obs.traces_base[0], np.float64)  # [T, 3]
        eef = np.asarray(obs.proprio[:3], np.float64)
        T = len(trace)
        prev = eef
        for i in range(self.chunk):
            point = trace[min((i + 1) * self.stride, T - 1)]
            actions[i, :3] = np.clip((point - prev) / self.pos_scale_m, -1, 1)
            prev = prev + actions[i, :3] * self.pos_scale_m
        return actions


# --------------------------------------------------------------------------- the loop


@dataclass
class LoopSettings:
    rate_hz: float = 10.0
    max_trace_age_s: float = 0.5
    send_size_wh: tuple[int, int] | None = None  # the server's required size, if any
    send_max_side: int | None = None
    pos_scale_m: float = 0.05
    rot_scale_rad: float = 0.5
    gripper_open: tuple[float, ...] = (0.04, -0.04)
    gripper_closed: tuple[float, ...] = (0.0, 0.0)
    expert_frame_yaw_deg: float = 0.0
    expert_seed: int | None = 0


@dataclass
class _Sent:
    T_base_cam: np.ndarray
    T_base_eef: np.ndarray
    proprio: np.ndarray
    frame_number: int
    point_rgb: np.ndarray  # float32[N, 3]: the queries' colours (policies.queries.point_colors)


@dataclass
class _Scheduled:
    due: float
    T_base_eef: np.ndarray
    gripper: float
    chunk_id: int


@dataclass
class RunSummary:
    ticks: int = 0
    frames_sent: int = 0
    chunks: int = 0
    commands_sent: int = 0
    holds: int = 0
    dropped_late_actions: int = 0
    overruns: int = 0
    ended_by: str = ""
    trace_age_ms: list[float] = field(default_factory=list)
    trace_rtt_ms: list[float] = field(default_factory=list)
    capture_to_receive_ms: list[float] = field(default_factory=list)
    expert_ms: list[float] = field(default_factory=list)
    tick_ms: list[float] = field(default_factory=list)
    hold_reasons: dict[str, int] = field(default_factory=dict)
    eef_path: list[list[float]] = field(default_factory=list)  # [t, x, y, z] sent targets
    safety: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        def pct(xs: list[float], q: float) -> float | None:
            return round(float(np.percentile(xs, q)), 2) if xs else None

        tp = np.asarray(self.eef_path) if self.eef_path else np.zeros((0, 4))
        t, path = tp[:, 0], tp[:, 1:]
        steps = np.linalg.norm(np.diff(path, axis=0), axis=1) if len(path) > 1 else np.zeros(0)
        speeds = steps / np.maximum(np.diff(t), 1e-9) if len(path) > 1 else np.zeros(0)
        out = {
            k: v
            for k, v in asdict(self).items()
            if not isinstance(v, list) and k not in ("hold_reasons", "safety")
        }
        for name in (
            "trace_age_ms",
            "trace_rtt_ms",
            "capture_to_receive_ms",
            "expert_ms",
            "tick_ms",
        ):
            xs = getattr(self, name)
            out[f"{name}_p50"] = pct(xs, 50)
            out[f"{name}_p90"] = pct(xs, 90)
        out["hold_reasons"] = dict(self.hold_reasons)
        out["commanded_path_m"] = round(float(steps.sum()), 4)
        out["commanded_max_speed_m_s"] = round(float(speeds.max()), 4) if speeds.size else 0.0
        if len(path):
            out["commanded_start_m"] = np.round(path[0], 4).tolist()
            out["commanded_end_m"] = np.round(path[-1], 4).tolist()
        out["safety"] = self.safety
        return out


class RealLoop:
    """Runs the loop of the module docstring. Everything is passed in, so the same loop
    drives a robot, a dry run, and the tests:

    camera: ``latest()`` -> frame with rgb, depth_m, intrinsics, frame_number, captured_at
        (an `envs.realsense.RealSenseCamera`); ``ended`` True once a recording is over.
    arm: an `envs.arm.SafeArm`.
    client: a streaming `runtime.client.TraceClient` (``start_stream`` already called).
    expert: ``act(ExpertObservation) -> float32[chunk, 7]`` with ``chunk``, ``execute``.
    calibration: a `calibration.files.CameraCalibration` (``T_base_cam_at(T_base_eef)``).
    query_builder: a `policies.queries.QueryBuilder`.
    """

    def __init__(
        self,
        camera: Any,
        arm: Any,
        client: Any,
        expert: Any,
        calibration: Any,
        query_builder: Any,
        instruction: str,
        settings: LoopSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        log_path: str | Path | None = None,
    ) -> None:
        from policies.base import ExpertObservation
        from policies.queries import point_colors, traces_to_base

        self._ExpertObservation = ExpertObservation
        self._traces_to_base = traces_to_base
        self._point_colors = point_colors
        self._act_takes_seed = "seed" in inspect.signature(expert.act).parameters
        self.camera, self.arm, self.client, self.expert = camera, arm, client, expert
        self.calibration = calibration
        self.queries = query_builder
        self.instruction = instruction
        self.s = settings or LoopSettings()
        self.clock, self.sleep = clock, sleep
        self.period = 1.0 / self.s.rate_hz
        self.T_expert_arm = rot_z(self.s.expert_frame_yaw_deg)
        self.poses = PoseHistory()
        self.queue: deque[_Scheduled] = deque()
        self.sent: dict[float, _Sent] = {}
        self.summary = RunSummary()
        self._last_frame = -1
        self._chunk_id = 0
        self._consumed = 0
        self._last_reply_id: int | None = None
        self._log = open(log_path, "w") if log_path else None  # noqa: SIM115 - closed in run()

    # ------------------------------------------------------------------ one tick

    def tick(self, now: float) -> dict[str, Any]:
        rec: dict[str, Any] = {"t": round(now, 6)}
        state = self.arm.read_state()
        self.poses.add(state.timestamp, state.T_base_eef, (state.joint_pos, state.gripper))
        self._send_frame(rec)
        if not self.queue or self._consumed >= self.expert.execute:
            self._new_chunk(now, rec)
        # Targets whose time has passed are dropped; the next one due is commanded.
        while self.queue and self.queue[0].due <= now:
            self.queue.popleft()
            self._consumed += 1
            self.summary.dropped_late_actions += 1
        if self.queue:
            item = self.queue.popleft()
            self._consumed += 1
            # Stamped with the tick it is meant to be sent at: the safety layer holds the
            # arm if a stalled loop tries to send it much later.
            report = self.arm.command_eef(
                item.T_base_eef, item.gripper, stamp=item.due - self.period
            )
            rec["chunk"] = item.chunk_id
            rec["target"] = np.round(item.T_base_eef[:3, 3], 5).tolist()
            if report.sent:
                self.summary.commands_sent += 1
                self.summary.eef_path.append([now, *report.T_sent[:3, 3].tolist()])
                rec["sent"] = np.round(report.T_sent[:3, 3], 5).tolist()
                rec["limited"] = bool(report.limited_speed or report.limited_accel)
                rec["clipped"] = bool(report.clipped_workspace)
            else:
                self._held(report.held, rec)
        else:
            self._held(rec.get("why_no_chunk") or "no action due", rec)
        return rec

    def _held(self, reason: str, rec: dict[str, Any]) -> None:
        if not self.arm.holding:
            self.arm.hold(reason)
        key = reason.split(" (")[0]
        self.summary.holds += 1
        self.summary.hold_reasons[key] = self.summary.hold_reasons.get(key, 0) + 1
        rec["held"] = reason

    def _send_frame(self, rec: dict[str, Any]) -> None:
        frame = self.camera.latest()
        if frame is None or frame.frame_number == self._last_frame:
            return
        self._last_frame = frame.frame_number
        # The pose when the picture was taken, not now: the arm has moved since.
        T_eef_cap = self.poses.at(frame.captured_at)
        joints, gripper = self.poses.nearest_extra(frame.captured_at)
        T_base_cam = self.calibration.T_base_cam_at(T_eef_cap)
        rgb, depth, K = prepare_images(
            frame.rgb, frame.depth_m, frame.intrinsics, self.s.send_size_wh, self.s.send_max_side
        )
        self.queries.observe(T_eef_cap[:3, 3])
        obs = self.queries.build(rgb, depth, K, T_base_cam, self.instruction)
        self.client.submit(obs, captured_at=frame.captured_at)
        T_exp = self.T_expert_arm
        proprio = make_proprio(
            T_exp @ T_eef_cap, gripper, joints, self.s.gripper_open, self.s.gripper_closed
        )
        self.sent[frame.captured_at] = _Sent(
            T_base_cam, T_eef_cap, proprio, frame.frame_number, self._point_colors(obs)
        )
        while len(self.sent) > 64:
            self.sent.pop(next(iter(self.sent)))
        self.summary.frames_sent += 1
        self.summary.capture_to_receive_ms.append(
            (frame.received_at - frame.captured_at) * 1e3 if hasattr(frame, "received_at") else 0.0
        )
        rec["frame"] = frame.frame_number

    def _new_chunk(self, now: float, rec: dict[str, Any]) -> None:
        reply = self.client.latest(max_age_s=self.s.max_trace_age_s)
        if reply is None:
            self.queue.clear()
            rec["why_no_chunk"] = f"no trace younger than {self.s.max_trace_age_s:g} s"
            return
        if reply.request_id == self._last_reply_id:
            # No newer trace yet: finish the current chunk, then wait for one.
            rec["why_no_chunk"] = "waiting for a newer trace"
            return
        self._last_reply_id = reply.request_id
        sent = self.sent.get(reply.captured_at)
        if sent is None:  # a trace for a frame this loop did not send (older run)
            rec["why_no_chunk"] = "trace for an unknown frame"
            self.queue.clear()
            return
        T_exp = self.T_expert_arm
        traces_base = self._traces_to_base(reply["traces_xyz_cam"], T_exp @ sent.T_base_cam)
        obs = self._ExpertObservation(
            traces_base=traces_base,
            trace_valid=np.ones(len(traces_base), bool),
            proprio=sent.proprio,
            instruction=self.instruction,
            point_rgb=sent.point_rgb,
        )
        t0 = time.perf_counter()
        if self._act_takes_seed:
            actions = self.expert.act(obs, seed=self.s.expert_seed)
        else:
            actions = self.expert.act(obs)
        self.summary.expert_ms.append((time.perf_counter() - t0) * 1e3)
        targets = delta_actions_to_targets(
            sent.T_base_eef,
            np.asarray(actions)[: self.expert.chunk],
            self.s.pos_scale_m,
            self.s.rot_scale_rad,
            R_arm_expert=T_exp[:3, :3].T,
        )
        self._chunk_id += 1
        t_cap = reply.captured_at
        self.queue = deque(
            _Scheduled(t_cap + (i + 1) * self.period, T, g, self._chunk_id)
            for i, (T, g) in enumerate(targets)
        )
        self._consumed = 0
        self.summary.chunks += 1
        self.summary.trace_age_ms.append(reply.age_s * 1e3)
        self.summary.trace_rtt_ms.append(reply.round_trip_ms)
        rec["new_chunk"] = self._chunk_id
        rec["trace_age_ms"] = round(reply.age_s * 1e3, 2)
        rec["trace_frame"] = sent.frame_number

    # ------------------------------------------------------------------ the run

    def run(self, max_ticks: int | None = None, duration_s: float | None = None) -> RunSummary:
        """Tick at ``rate_hz`` until ``max_ticks``, ``duration_s``, the end of a recording,
        an emergency stop, or Ctrl-C. The arm is held when it ends."""
        from envs.arm import EmergencyStop

        start = self.clock()
        k = 0
        try:
            while True:
                if max_ticks is not None and k >= max_ticks:
                    self.summary.ended_by = "max_ticks"
                    break
                if duration_s is not None and self.clock() - start >= duration_s:
                    self.summary.ended_by = "duration"
                    break
                if getattr(self.camera, "ended", False):
                    self.summary.ended_by = "end of recording"
                    break
                due = start + k * self.period
                now = self.clock()
                t0 = time.perf_counter()
                rec = self.tick(now)
                rec["tick_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
                self.summary.tick_ms.append(rec["tick_ms"])
                self.summary.ticks += 1
                if self._log is not None:
                    self._log.write(json.dumps(rec) + "\n")
                k += 1
                next_due = start + k * self.period
                now = self.clock()
                if now > next_due:  # late: skip the ticks already missed
                    missed = int((now - next_due) / self.period) + 1
                    self.summary.overruns += 1
                    k += missed
                    log.warning("tick %d ran %.1f ms over", k, (now - due) * 1e3)
                    continue
                self.sleep(max(0.0, next_due - now))
        except EmergencyStop as e:
            self.summary.ended_by = f"emergency stop: {e}"
        except KeyboardInterrupt:
            self.summary.ended_by = "interrupted"
        finally:
            if self.arm.emergency_stopped is None:
                try:
                    self.arm.hold("loop ended")
                except Exception:  # noqa: BLE001 - ending anyway
                    log.exception("could not hold the arm at the end")
            if self._log is not None:
                self._log.close()
                self._log = None
            counts = self.arm.counts
            self.summary.safety = {k: v for k, v in asdict(counts).items() if k != "reasons"} | {
                "hold_reasons": dict(counts.reasons)
            }
        return self.summary


def T_from_pose6(pose: tuple[float, ...]) -> np.ndarray:
    """x, y, z, rx, ry, rz (metres, rotation vector) -> float64[4, 4]."""
    if len(pose) != 6:
        raise ValueError(f"a pose is x, y, z, rx, ry, rz; got {len(pose)} numbers")
    return make_T(rotvec_to_matrix(pose[3:]), pose[:3])


__all__ = [
    "FollowGripperTrace",
    "LoopSettings",
    "PoseHistory",
    "RealLoop",
    "RunSummary",
    "T_from_pose6",
    "delta_actions_to_targets",
    "make_proprio",
    "prepare_images",
    "rot_z",
]
