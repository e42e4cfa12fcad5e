"""The control loop: environment, action expert and trace client at a fixed rate.

Every step (``rate_hz``):
1. read the observation; record the gripper position for its query history;
2. send the observation to the trace server without waiting (the client's streaming mode:
   newest wins); the loop never blocks on the server;
3. every ``expert.execute`` steps, or when the queue runs dry, ask the expert for a new chunk
   with the newest trace no older than ``trace_max_age_s`` — or none (condition `no_trace`);
   actions carry the step they are meant for, and those whose step has passed are dropped;
4. act; with no usable trace in a trace-conditioned run, hold (zero motion, gripper kept).

Conditions: ``mu0`` (traces from the frozen μ0 via the server), ``no_trace`` (the same expert
without traces: it then sees no scene points either), ``static_trace`` (the same query
points, each held at its current position over the horizon: the scene without a forecast,
so ``mu0`` against it measures what the forecast itself is worth) and ``oracle`` (the true
futures of the same query points over the next 32 steps, the target μ0 is trained on, from a
look-ahead with the task's scripted demonstrator in a shadow simulator).

In simulation the loop steps as fast as the simulator allows (``realtime=False``) or paces
itself to wall-clock ``rate_hz`` (``realtime=True``); latencies and trace ages are wall-clock.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mu0_core.types import HORIZON
from policies.base import ExpertObservation
from policies.queries import QueryBuilder, point_colors, query_points_cam, traces_to_base

CONDITIONS = ("mu0", "no_trace", "static_trace", "oracle")


@dataclass
class LoopConfig:
    rate_hz: float = 20.0
    trace_max_age_s: float = 1.0
    realtime: bool = False
    num_scene_points: int = 32


@dataclass
class Handover:
    """The scripted demonstrator takes over from the expert, for recovery demonstrations.

    From ``step`` on, at the first state it can pick up from cleanly (the object between the
    fingers, or the hand commanded open for ``open_steps`` steps: not in the middle of closing
    on the object), the task's demonstrator drives instead of the expert, to the end of the
    episode. It picks up wherever the expert left the scene: a dropped object is grasped again.
    A hand that stays closed on nothing is never taken over.
    """

    step: int
    demonstrator: Any
    open_steps: int = 10
    taken_at: int | None = None
    _open_run: int = field(default=0, init=False)  # steps in a row the hand was commanded open

    def ready(self, env, step: int, last_gripper: float | None) -> bool:
        """Called every step before the takeover, with the previous action's gripper command
        (None at the first step)."""
        if last_gripper is not None:
            self._open_run = self._open_run + 1 if last_gripper <= 0.0 else 0
        if step < self.step:
            return False
        return self._open_run >= self.open_steps or self.demonstrator.object_in_hand(env)


@dataclass
class EpisodeResult:
    success: bool
    steps: int
    step_ms: list[float] = field(default_factory=list)  # loop step, wall-clock
    expert_ms: list[float] = field(default_factory=list)  # one expert call
    trace_age_ms: list[float] = field(default_factory=list)  # age of the trace each chunk used
    trace_rtt_ms: list[float] = field(default_factory=list)  # client round trip of that trace
    held_steps: int = 0  # steps held for want of a fresh trace
    dropped_actions: int = 0  # stale actions dropped
    frames: list[np.ndarray] = field(default_factory=list)


class GroundTruthTraces:
    """Oracle traces: the query points' true futures, by looking ahead with the demonstrator.

    A shadow copy of the env (no rendering) is set to the live state, a fresh scripted
    demonstrator of the task (whose phases follow from the state, so it picks up wherever the
    expert has brought the scene) drives it for the next ``horizon - 1`` control steps (the
    window μ0 forecasts, one step a frame), and each query point follows the body it lies on
    (from the live camera's segmentation). A demonstrator kept in
    step with the live episode instead drifts out of phase once the expert acts differently.
    """

    def __init__(self, task: str, robot: str, horizon: int = HORIZON):
        from envs.demos import make_demonstrator
        from envs.robosuite_env import RobosuiteTraceEnv

        self.shadow = RobosuiteTraceEnv(task, robot, render_images=False)
        self.task = task
        self._make_demo = make_demonstrator
        self.horizon = horizon

    def reset(self, seed: int) -> None:
        self.shadow.reset(seed=seed)

    def __call__(self, env, wire_obs: dict[str, Any], T_base_cam: np.ndarray) -> np.ndarray:
        import mujoco

        sim, sh = env.sim, self.shadow.sim
        cam = env.camera_names[0]
        H, W = env.image_hw
        seg = sim.render(camera_name=cam, height=H, width=W, segmentation=True)[::-1]
        xyz_cam = query_points_cam(wire_obs)
        T_world_cam = env.T_world_base() @ T_base_cam
        p_world = xyz_cam @ T_world_cam[:3, :3].T + T_world_cam[:3, 3]
        u = np.round(((wire_obs["hist_uvz"][:, -1, 0] + 1) * W - 1) / 2).astype(int).clip(0, W - 1)
        v = np.round(((wire_obs["hist_uvz"][:, -1, 1] + 1) * H - 1) / 2).astype(int).clip(0, H - 1)
        is_geom = seg[v, u, 0] == mujoco.mjtObj.mjOBJ_GEOM
        body = np.where(is_geom, sim.model.geom_bodyid[np.where(is_geom, seg[v, u, 1], 0)], 0)
        # Each point in its body's frame, then carried along as the body moves.
        R0 = sim.data.xmat[body].reshape(-1, 3, 3).copy()
        local = np.einsum("nji,nj->ni", R0, p_world - sim.data.xpos[body])

        sh.set_state_from_flattened(sim.get_state().flatten())
        sh.forward()
        self.shadow.robosuite_env.timestep = max(1, env.robosuite_env.timestep)
        demo = self._make_demo(self.task)
        path = [p_world]
        for _ in range(self.horizon - 1):
            self.shadow.step(demo(self.shadow))
            pts = np.einsum("nij,nj->ni", sh.data.xmat[body].reshape(-1, 3, 3), local)
            pts = pts + sh.data.xpos[body]
            pts[0] = self.shadow.T_world_eef()[:3, 3]  # query 0 is the grip site itself
            path.append(pts)
        out = np.stack(path, 1)  # [N, horizon, 3]: one step a control step, as μ0's window
        T_base_world = np.linalg.inv(env.T_world_base())
        return (out @ T_base_world[:3, :3].T + T_base_world[:3, 3]).astype(np.float32)

    def close(self) -> None:
        self.shadow.close()


def _hold(last_gripper: float) -> np.ndarray:
    a = np.zeros(7, np.float32)
    a[6] = last_gripper
    return a


def run_episode(
    env,
    expert,
    condition: str,
    seed: int,
    client=None,
    oracle: GroundTruthTraces | None = None,
    cfg: LoopConfig | None = None,
    max_steps: int | None = None,
    record_frames: bool = False,
    success_hold_steps: int = 10,
    handover: Handover | None = None,
    on_step=None,
) -> EpisodeResult:
    """One seeded episode of the loop described in the module docstring.

    ``handover``: the scripted demonstrator takes over partway (see `Handover`; its
    ``taken_at`` says when). ``on_step(obs, action, success)`` sees every step's observation
    and the action taken on it (a recorder, say).
    """
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    if condition == "mu0" and client is None:
        raise ValueError("condition 'mu0' needs a trace client")
    if condition == "oracle" and oracle is None:
        raise ValueError("condition 'oracle' needs a GroundTruthTraces")
    from envs import MAX_EPISODE_STEPS

    cfg = cfg or LoopConfig()
    max_steps = max_steps or MAX_EPISODE_STEPS[env.task]
    obs, _ = env.reset(seed=seed)
    if oracle is not None:
        oracle.reset(seed)
    qb = QueryBuilder(cfg.num_scene_points)
    queue: deque[tuple[int, np.ndarray]] = deque()  # (step it is meant for, action)
    res = EpisodeResult(success=False, steps=0)
    period = 1.0 / cfg.rate_hz
    last_gripper = -1.0
    # capture time → (T_base_cam, point colours) of what was sent
    sent: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    streak = 0
    traces_base, trace_valid, point_rgb = None, None, None
    info = {"success": False}
    for step in range(max_steps):
        t0 = time.perf_counter()
        if handover is not None and handover.taken_at is None:
            if handover.ready(env, step, last_gripper if step else None):
                handover.taken_at = step
                handover.demonstrator.reset()
        if handover is not None and handover.taken_at is not None:
            action = handover.demonstrator(env)
            if on_step is not None:
                on_step(obs, action, bool(info["success"]))
            obs, _, _, _, info = env.step(action)
            streak = streak + 1 if info["success"] else 0
            res.steps = step + 1
            if streak >= success_hold_steps:
                break
            continue
        qb.observe(obs["proprio"][:3])
        T_base_cam = obs["T_base_cam"].astype(np.float64)
        need_chunk = len(queue) <= expert.chunk - expert.execute or not queue
        # μ0 gets every frame (newest wins); the others need queries only for a new chunk.
        wire = None
        if condition == "mu0" or (condition in ("oracle", "static_trace") and need_chunk):
            wire = qb.build(
                obs["rgb"], obs["depth_m"], obs["intrinsics"], T_base_cam, obs["instruction"]
            )
        if condition == "mu0":
            captured = time.monotonic()
            client.submit(wire, captured_at=captured)
            sent[captured] = (T_base_cam, point_colors(wire))
            if len(sent) > 64:
                sent.pop(next(iter(sent)))
        if need_chunk:
            available = True
            if condition == "mu0":
                reply = client.latest(max_age_s=cfg.trace_max_age_s)
                # A reply for a frame this loop no longer knows (evicted) is not used.
                if reply is None or reply.captured_at not in sent:
                    available = False
                else:
                    # The trace answers an earlier observation: use that frame's calibration
                    # and colours.
                    T_sent, point_rgb = sent[reply.captured_at]
                    traces_base = traces_to_base(reply["traces_xyz_cam"], T_sent)
                    trace_valid = np.ones(len(traces_base), bool)
                    res.trace_age_ms.append(reply.age_s * 1e3)
                    res.trace_rtt_ms.append(reply.round_trip_ms)
            elif condition in ("oracle", "static_trace"):
                if condition == "oracle":
                    traces_base = oracle(env, wire, T_base_cam)
                else:
                    now = traces_to_base(query_points_cam(wire)[:, None], T_base_cam)  # [N, 1, 3]
                    traces_base = np.repeat(now, HORIZON, axis=1)
                point_rgb = point_colors(wire)
                trace_valid = np.ones(len(traces_base), bool)
                res.trace_age_ms.append(0.0)
            if condition == "no_trace" or available:
                te = time.perf_counter()
                chunk = expert.act(
                    ExpertObservation(
                        traces_base=traces_base
                        if traces_base is not None
                        else np.zeros((1, 32, 3), np.float32),
                        trace_valid=trace_valid if trace_valid is not None else np.zeros(1, bool),
                        proprio=obs["proprio"],
                        instruction=obs["instruction"],
                        traces_available=condition != "no_trace",
                        point_rgb=point_rgb,
                    ),
                    seed=seed * 1000 + step,
                )
                res.expert_ms.append((time.perf_counter() - te) * 1e3)
                queue = deque((step + i, a) for i, a in enumerate(chunk))
        while queue and queue[0][0] < step:  # stale: meant for a step already gone
            queue.popleft()
            res.dropped_actions += 1
        if queue:
            action = queue.popleft()[1]
        else:
            action = _hold(last_gripper)
            res.held_steps += 1
        last_gripper = float(action[6])
        if record_frames:
            res.frames.append(_draw(obs, traces_base, condition))
        if on_step is not None:
            on_step(obs, action, bool(info["success"]))
        obs, _, _, _, info = env.step(action)
        streak = streak + 1 if info["success"] else 0
        res.step_ms.append((time.perf_counter() - t0) * 1e3)
        res.steps = step + 1
        if cfg.realtime:
            time.sleep(max(0.0, period - (time.perf_counter() - t0)))
        if streak >= success_hold_steps:
            break
    res.success = bool(streak >= success_hold_steps or info["success"])
    return res


VIDEO_MIN_PX = 256


def _draw(obs: dict[str, Any], traces_base: np.ndarray | None, condition: str) -> np.ndarray:
    """The camera image, scaled to at least ``VIDEO_MIN_PX`` a side, with the traces in use
    drawn on it: the gripper's in red, scene points that move 1 cm or more in cyan (a white
    dot where the point is now, a filled one where it is forecast at the horizon's end)."""
    from mu0_core.extract import import_cv2

    cv2 = import_cv2()
    img = np.ascontiguousarray(obs["rgb"]).copy()
    scale = max(1, int(np.ceil(VIDEO_MIN_PX / min(img.shape[:2]))))  # at least 256 px a side
    img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    if traces_base is not None:
        T_cam_base = np.linalg.inv(obs["T_base_cam"].astype(np.float64))
        p = traces_base @ T_cam_base[:3, :3].T + T_cam_base[:3, 3]
        fx, fy, cx, cy = obs["intrinsics"]
        z = np.maximum(p[..., 2], 1e-3)
        uv = np.stack([fx * p[..., 0] / z + cx, fy * p[..., 1] / z + cy], -1) * scale
        for n in range(len(uv)):
            moved = np.linalg.norm(traces_base[n, -1] - traces_base[n, 0])
            if n > 0 and moved < 0.01:
                continue
            color = (255, 40, 40) if n == 0 else (40, 220, 255)
            pts = np.round(uv[n]).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(img, [pts], False, color, 2, cv2.LINE_AA)
            cv2.circle(img, tuple(int(x) for x in pts[0, 0]), 2, (255, 255, 255), -1)  # now
            cv2.circle(img, tuple(int(x) for x in pts[-1, 0]), 4, color, -1)  # in 32 steps
    cv2.putText(img, condition, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
    return img


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score 95% interval of a success rate."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
