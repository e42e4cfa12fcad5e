"""`mu0 run-real`: delta actions to targets, latency compensation, holds on stale traces,
wrist-camera frames at capture time, set-up files, and a whole dry run from a recorded
stream through a real trace server (nothing commanded)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from calibration.files import CameraCalibration
from calibration.transforms import make_T, pose_error, rotvec_to_matrix
from envs.arm import ManualClock, SafeArm, SafetyConfig, SimArm
from runtime import wire
from runtime.real import (
    LoopSettings,
    PoseHistory,
    RealLoop,
    delta_actions_to_targets,
    make_proprio,
    prepare_images,
)

pytest.importorskip("torch")  # policies.base (ExpertObservation) imports it

DOWN = np.diag([1.0, -1.0, -1.0])
START = make_T(DOWN, [0.5, 0.0, 0.2])


# --------------------------------------------------------------------------- pieces


def test_delta_actions_become_absolute_targets():
    actions = np.zeros((3, 7), np.float32)
    actions[:, 0] = 0.2  # 1 cm per step along x
    actions[1, 5] = 0.1  # then a 0.05 rad turn about z
    actions[:, 6] = [-1.0, 0.0, 1.0]
    targets = delta_actions_to_targets(START, actions, pos_scale_m=0.05, rot_scale_rad=0.5)
    np.testing.assert_allclose([T[0, 3] for T, _ in targets], [0.51, 0.52, 0.53], atol=1e-12)
    _, rot = pose_error(targets[2][0], START)
    assert rot == pytest.approx(np.rad2deg(0.05))
    assert [g for _, g in targets] == [0.0, 0.5, 1.0]
    # An arm whose base is turned 180° about z from the expert's: +x becomes -x.
    turned = delta_actions_to_targets(START, actions[:1], R_arm_expert=np.diag([-1.0, -1.0, 1.0]))
    assert turned[0][0][0, 3] == pytest.approx(0.49)
    with pytest.raises(ValueError, match=r"\[K, 7\]"):
        delta_actions_to_targets(START, np.zeros((3, 6)))


def test_pose_history_gives_the_pose_at_capture_time():
    h = PoseHistory()
    h.add(1.0, make_T(np.eye(3), [0.0, 0.0, 0.0]), "a")
    h.add(2.0, make_T(rotvec_to_matrix([0.0, 0.0, 0.4]), [0.2, 0.0, 0.0]), "b")
    T = h.at(1.25)
    np.testing.assert_allclose(T[:3, 3], [0.05, 0.0, 0.0])
    _, rot = pose_error(T, np.eye(4))
    assert rot == pytest.approx(np.rad2deg(0.1))
    np.testing.assert_allclose(h.at(0.0), np.eye(4))  # before: the first
    assert h.at(5.0)[0, 3] == pytest.approx(0.2)  # after: the last
    assert h.nearest_extra(1.9) == "b"
    with pytest.raises(ValueError, match="time order"):
        h.add(1.5, np.eye(4))


def test_resized_images_keep_their_projection():
    K = np.array([600.0, 610.0, 319.5, 239.5], np.float32)
    rgb = np.zeros((480, 640, 3), np.uint8)
    depth = np.ones((480, 640), np.float32)
    _, depth_r, K_r = prepare_images(rgb, depth, K, max_side=320)
    assert depth_r.shape == (240, 320)
    p = np.array([0.1, -0.05, 0.8])
    u, v = K[0] * p[0] / p[2] + K[2], K[1] * p[1] / p[2] + K[3]
    u_r, v_r = K_r[0] * p[0] / p[2] + K_r[2], K_r[1] * p[1] / p[2] + K_r[3]
    # Pixel centres scale as (u + 0.5) * s - 0.5.
    assert u_r == pytest.approx((u + 0.5) * 0.5 - 0.5, abs=1e-4)
    assert v_r == pytest.approx((v + 0.5) * 0.5 - 0.5, abs=1e-4)
    same = prepare_images(rgb, depth, K)
    assert same[1] is depth


def test_proprio_layout_matches_the_environments():
    p = make_proprio(START, 0.25, np.arange(7.0), (0.04, -0.04), (0.0, 0.0))
    assert p.dtype == np.float32 and p.shape == (3 + 4 + 2 + 7,)
    np.testing.assert_allclose(p[:3], [0.5, 0.0, 0.2])
    np.testing.assert_allclose(np.abs(p[3:7]), [1.0, 0.0, 0.0, 0.0], atol=1e-7)  # x, y, z, w
    np.testing.assert_allclose(p[7:9], [0.03, -0.03])


# --------------------------------------------------------------------------- set-up files


def test_shipped_setups_load_and_mistakes_are_named(tmp_path):
    from configs.real import load_real_setup

    ur = load_real_setup("configs/real/ur5e_d435.yaml")
    assert ur.arm.backend == "ur" and ur.safety.max_linear_speed == 0.15
    assert ur.safety.workspace_min == (0.25, -0.35, 0.02)
    sim = load_real_setup("configs/real/sim_dry_run.yaml")
    assert sim.expert.builtin == "follow-gripper-trace"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ninstruction: y\nsafety:\n  max_linear_sped: 0.1\n")
    with pytest.raises(ValueError, match="did you mean 'max_linear_speed'"):
        load_real_setup(bad)
    bad.write_text("name: x\ninstruction: y\nrate_hz: 10\ncamra: {}\n")
    with pytest.raises(ValueError, match="did you mean 'camera'"):
        load_real_setup(bad)
    bad.write_text("instruction: y\n")
    with pytest.raises(ValueError, match="missing required key 'name'"):
        load_real_setup(bad)
    bad.write_text("name: !!python/object/apply:os.system ['echo hi']\ninstruction: y\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_real_setup(bad)
    bad.write_text("name: x\ninstruction: y\narm: {backend: ur}\n")
    with pytest.raises(ValueError, match="arm.host is required"):
        load_real_setup(bad)
    with pytest.raises(FileNotFoundError, match="ur5e_d435.yaml"):
        load_real_setup(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- the loop


@dataclass
class _Frame:
    rgb: np.ndarray
    depth_m: np.ndarray
    intrinsics: np.ndarray
    frame_number: int
    captured_at: float
    received_at: float


class _Camera:
    """A new frame at every tick, captured ``lag_s`` before the tick."""

    def __init__(self, clock, lag_s=0.03):
        self.clock, self.lag_s, self.n = clock, lag_s, 0
        self.ended = False

    def latest(self):
        self.n += 1
        t = self.clock() - self.lag_s
        return _Frame(
            np.zeros((48, 64, 3), np.uint8),
            np.ones((48, 64), np.float32),
            np.array([60.0, 60.0, 31.5, 23.5], np.float32),
            self.n,
            t,
            t + 0.01,
        )


class _Reply:
    def __init__(self, request_id, captured_at, clock, rtt_s):
        self.request_id, self.captured_at, self.clock = request_id, captured_at, clock
        self.round_trip_ms = rtt_s * 1e3
        self.arrays = {"traces_xyz_cam": np.zeros((3, 32, 3), np.float32)}

    @property
    def age_s(self):
        return self.clock() - self.captured_at

    def __getitem__(self, key):
        return self.arrays[key]


class _Client:
    """Answers each observation ``rtt_s`` after it was sent; ``down`` stops answering."""

    def __init__(self, clock, rtt_s=0.25):
        self.clock, self.rtt_s, self.sent, self.down = clock, rtt_s, [], False

    def submit(self, obs, captured_at):
        self.sent.append((self.clock(), captured_at))

    def latest(self, max_age_s):
        now = self.clock()
        done = [
            (i, cap)
            for i, (t, cap) in enumerate(self.sent)
            if t + self.rtt_s <= now and not self.down
        ]
        if not done:
            return None
        i, cap = done[-1]
        reply = _Reply(i + 1, cap, self.clock, self.rtt_s)
        return reply if reply.age_s <= max_age_s else None


class _Expert:
    """1 cm along x per step; records what it saw."""

    chunk, execute = 6, 3

    def __init__(self):
        self.seen = []

    def act(self, obs):
        self.seen.append(obs)
        a = np.zeros((self.chunk, 7), np.float32)
        a[:, 0] = 0.2
        a[:, 6] = 1.0
        return a


class _Queries:
    def __init__(self):
        self.T_base_cam = []

    def observe(self, eef_pos):
        pass

    def build(self, rgb, depth, K, T_base_cam, instruction):
        self.T_base_cam.append(np.array(T_base_cam))
        return {"rgb": rgb, "hist_uvz": np.zeros((2, 8, 3), np.float32)}  # two queries


def _calibration(kind="eye_to_hand"):
    T = make_T(rotvec_to_matrix([2.2, 0.0, 0.0]), [1.0, 0.0, 0.5])
    if kind == "eye_in_hand":
        T = make_T(rotvec_to_matrix([0.0, 0.0, 1.57]), [0.05, 0.0, -0.02])
    return CameraCalibration(kind, "CAM", (60.0, 60.0, 31.5, 23.5), (64, 48), T)


def _loop(clock, client=None, expert=None, kind="eye_to_hand", max_age=0.5, **safety):
    sim = SimArm(START, clock=clock)
    limits = dict(
        max_linear_speed=10.0, max_linear_accel=1000.0, max_command_age_s=0.3, watchdog_s=10.0
    )
    limits.update(safety)
    arm = SafeArm(sim, SafetyConfig(**limits), clock=clock, watchdog=False).connect()
    queries = _Queries()
    loop = RealLoop(
        _Camera(clock),
        arm,
        client or _Client(clock),
        expert or _Expert(),
        _calibration(kind),
        queries,
        "pick up the cube",
        LoopSettings(rate_hz=10.0, max_trace_age_s=max_age),
        clock=clock,
        sleep=clock.advance,
    )
    return loop, sim, queries


def test_chunks_are_integrated_from_the_capture_pose_and_late_targets_dropped():
    clock = ManualClock()
    expert = _Expert()
    loop, sim, _ = _loop(clock, expert=expert)
    summary = loop.run(max_ticks=12)
    assert summary.chunks >= 2 and summary.commands_sent >= 6
    # The first trace answers a frame captured 0.03 s before tick 0 (t = 0) and is there at
    # tick 3 (t = 0.3, 0.33 s after capture): the targets due at capture + 0.1, 0.2 and
    # 0.3 have passed and are dropped; the one due at capture + 0.4, 4 cm from where the
    # arm was at capture, is commanded.
    first = sim.commands[0][1]
    np.testing.assert_allclose(first[:3, 3], START[:3, 3] + [0.04, 0.0, 0.0], atol=1e-6)
    assert summary.dropped_late_actions >= 3
    # The expert saw the pose the arm had when the picture was taken, in the env layout.
    np.testing.assert_allclose(expert.seen[0].proprio[:3], START[:3, 3], atol=1e-6)
    assert expert.seen[0].traces_base.shape == (3, 32, 3)
    # Gripper +1 (close) reaches the arm as 1.0.
    assert sim.commands[0][2] == 1.0
    # Before the first trace, the arm was held, saying why.
    assert summary.hold_reasons.get("no trace younger than 0.5 s", 0) >= 1


def test_no_fresh_trace_holds_the_arm():
    clock = ManualClock()
    client = _Client(clock, rtt_s=0.8)  # slower than the age budget
    loop, sim, _ = _loop(clock, client=client, max_age=0.5)
    summary = loop.run(max_ticks=10)
    assert summary.commands_sent == 0 and not [c for c in sim.commands if c[0] == "eef"]
    assert summary.hold_reasons == {"no trace younger than 0.5 s": 10}
    # The server goes away mid-run: once the queued chunk is spent, the arm holds.
    clock2 = ManualClock()
    client2 = _Client(clock2)
    loop2, sim2, _ = _loop(clock2, client=client2)
    loop2.run(max_ticks=8)
    client2.down = True
    n = len(sim2.commands)
    summary2 = loop2.run(max_ticks=10)
    assert len(sim2.commands) - n <= _Expert.chunk
    assert loop2.arm.holding and summary2.hold_reasons.get("no trace younger than 0.5 s", 0) >= 5


def test_wrist_camera_uses_the_pose_at_capture_time():
    clock = ManualClock()
    loop, sim, queries = _loop(clock, kind="eye_in_hand")
    loop.run(max_ticks=10)
    # Each frame was taken 30 ms before its tick; the arm moved since, so the camera pose
    # sent with it is the interpolated pose at capture, times T_eef_cam.
    calib = _calibration("eye_in_hand")
    hist = loop.poses
    moved = False
    for k, T_base_cam in enumerate(queries.T_base_cam):
        frame_time = 1000.0 + 0.1 * k - 0.03
        expected = hist.at(frame_time) @ calib.T_eef_cam
        np.testing.assert_allclose(T_base_cam, expected, atol=1e-9)
        moved |= not np.allclose(hist.at(frame_time), hist.at(frame_time + 0.03))
    assert moved  # the check above was not vacuous


def test_safety_limits_apply_to_what_the_loop_sends():
    clock = ManualClock()
    loop, sim, _ = _loop(
        clock,
        workspace_min=(0.3, -0.3, 0.0),
        workspace_max=(0.52, 0.3, 0.4),
        max_linear_speed=0.05,
        max_linear_accel=1.0,
    )
    summary = loop.run(max_ticks=30)
    xs = [c[1][0, 3] for c in sim.commands if c[0] == "eef"]
    assert max(xs) <= 0.52 + 1e-12
    steps = np.abs(np.diff([0.5] + xs))
    assert steps.max() <= 0.05 * 0.1 + 1e-9
    assert summary.commands_sent > 0
    figures = summary.figures()
    assert figures["commanded_max_speed_m_s"] <= 0.05 + 1e-9
    assert figures["commanded_end_m"][0] == pytest.approx(0.52)


# --------------------------------------------------------------------------- a whole dry run


def test_dry_run_from_a_recorded_stream(tmp_path):
    pytest.importorskip("pyrealsense2")
    pytest.importorskip("cv2")
    from envs.realsense import write_recording
    from runtime.cli import main
    from runtime.model_api import EchoTraceModel
    from tests.runtime_helpers import running_server

    W, H = 96, 72
    K = (80.0, 80.0, 47.5, 35.5)
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(30):
        rgb = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)  # texture for scene points
        depth = np.full((H, W), 0.7, np.float32)
        frames.append((rgb, depth))
    write_recording(tmp_path / "stream.db3", frames, width=W, height=H, intrinsics=K, serial="REC")
    T_base_cam = make_T(rotvec_to_matrix([2.2, 0.0, 0.0]), [1.0, 0.0, 0.5])
    CameraCalibration("eye_to_hand", "REC", K, (W, H), T_base_cam).save(tmp_path / "calib")
    with running_server(EchoTraceModel(image_size=None)) as server:
        config = tmp_path / "setup.yaml"
        config.write_text(
            f"""
name: test_dry_run
instruction: pick up the cube
rate_hz: 10
camera: {{recording: {tmp_path / "stream.db3"}}}
calibration: {{path: {tmp_path / "calib"}}}
server: {{address: "tcp://127.0.0.1:{server.port}", max_trace_age_s: 2.0}}
expert: {{builtin: follow-gripper-trace}}
queries: {{scene_points: 8}}
arm: {{backend: ur, host: 192.0.2.1, num_joints: 6}}
proprio: {{gripper_open: [0.0], gripper_closed: [1.0]}}
dry_run: {{start_eef_pose: [0.5, 0.0, 0.2, 3.14159265, 0.0, 0.0]}}
"""
        )
        out = tmp_path / "figures.json"
        log = tmp_path / "ticks.jsonl"
        rc = main(
            [
                "run-real",
                "--config",
                str(config),
                "--dry-run",
                "--json",
                str(out),
                "--log",
                str(log),
            ]
        )
    assert rc == 0
    figures = json.loads(out.read_text())
    assert figures["dry_run"] and figures["ended_by"] == "end of recording"
    assert figures["frames_sent"] >= 3 and figures["chunks"] >= 1
    # The echo model forecasts no motion; following it, the virtual arm stays where it is.
    assert figures["commands_sent"] >= 1
    np.testing.assert_allclose(figures["commanded_end_m"], [0.5, 0.0, 0.2], atol=1e-4)
    ticks = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(ticks) == figures["ticks"] and any("new_chunk" in t for t in ticks)
    # The arm configured (a UR at 192.0.2.1) was never contacted: the dry run built a
    # virtual arm, or connecting would have failed.


def test_client_from_a_setup_speaks_curve(tmp_path):
    """The set-up's key files reach a CURVE server; a robot whose key is not allowed gets
    no answer at all."""
    import zmq.auth

    from configs.real import setup_from_dict
    from runtime.commands.run_real import build_client
    from runtime.server import CurveConfig
    from tests.runtime_helpers import running_server

    keys, clients, strangers = tmp_path / "keys", tmp_path / "keys" / "clients", tmp_path / "x"
    for d in (keys, clients, strangers):
        d.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(keys, "server")
    zmq.auth.create_certificates(clients, "robot1")
    zmq.auth.create_certificates(strangers, "robot2")
    curve = CurveConfig.from_files(keys / "server.key_secret", [clients])
    with running_server(curve=curve) as server:

        def setup(secret):
            return setup_from_dict(
                {
                    "name": "t",
                    "instruction": "i",
                    "server": {
                        "address": f"tcp://127.0.0.1:{server.port}",
                        "server_public_key": str(keys / "server.key"),
                        "client_secret_key": str(secret),
                        "timeout_s": 0.5,
                    },
                }
            )

        with build_client(setup(clients / "robot1.key_secret")) as client:
            assert client.hello()["protocol_version"] == wire.PROTOCOL_VERSION
        with build_client(setup(strangers / "robot2.key_secret")) as client:
            with pytest.raises(TimeoutError):
                client.hello()
    with pytest.raises(ValueError, match="needs both"):
        build_client(
            setup_from_dict({"name": "t", "instruction": "i", "server": {"server_public_key": "k"}})
        )
