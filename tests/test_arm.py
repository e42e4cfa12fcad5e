"""The arm interface and its safety layer, against a simulated arm on a stepped clock; the
UR backend against stand-ins for ur_rtde and the Robotiq gripper's socket."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

from calibration.transforms import make_T, pose_error, rotation_angle_deg, rotvec_to_matrix
from envs.arm import EmergencyStop, ManualClock, SafeArm, SafetyConfig, SimArm

DOWN = np.diag([1.0, -1.0, -1.0])  # gripper pointing down
DT = 0.05


def _arm(**safety):
    clock = ManualClock()
    sim = SimArm(make_T(DOWN, [0.5, 0.0, 0.3]), clock=clock)
    safe = SafeArm(sim, SafetyConfig(**safety), clock=clock, watchdog=False).connect()
    return safe, sim, clock


def _drive(safe, clock, target, steps, gripper=None):
    sent = []
    for _ in range(steps):
        clock.advance(DT)
        report = safe.command_eef(target, gripper)
        sent.append(report.T_sent)
    return sent


def test_targets_are_clipped_into_the_workspace_box():
    safe, sim, clock = _arm(workspace_min=(0.3, -0.2, 0.1), workspace_max=(0.7, 0.2, 0.4))
    sent = _drive(safe, clock, make_T(DOWN, [0.9, 0.5, -0.1]), 80)
    np.testing.assert_allclose(sent[-1][:3, 3], [0.7, 0.2, 0.1], atol=1e-9)
    for T in sent:
        p = T[:3, 3]
        assert np.all(p >= np.array([0.3, -0.2, 0.1]) - 1e-12)
        assert np.all(p <= np.array([0.7, 0.2, 0.4]) + 1e-12)
    assert safe.counts.clipped_workspace == 80


def test_speed_and_acceleration_limits_then_exact_arrival():
    safe, sim, clock = _arm(max_linear_speed=0.2, max_linear_accel=1.0)
    target = make_T(DOWN, [0.7, 0.1, 0.2])
    sent = _drive(safe, clock, target, 60)
    p = np.array([T[:3, 3] for T in [make_T(DOWN, [0.5, 0.0, 0.3])] + sent])
    v = np.linalg.norm(np.diff(p, axis=0), axis=1) / DT
    assert v.max() <= 0.2 + 1e-9
    assert np.all(np.abs(np.diff(v)) <= 1.0 * DT + 1e-9)
    assert v[0] <= 1.0 * DT + 1e-9  # from rest
    # It gets there, without overshooting.
    np.testing.assert_allclose(sent[-1][:3, 3], target[:3, 3], atol=1e-9)
    dist = np.linalg.norm(p - target[:3, 3], axis=1)
    assert np.all(np.diff(dist) <= 1e-12)


def test_rotation_is_rate_limited_too():
    safe, sim, clock = _arm(max_angular_speed=0.5, max_angular_accel=2.0)
    target = make_T(rotvec_to_matrix([0.0, 0.0, 1.0]) @ DOWN, [0.5, 0.0, 0.3])
    sent = _drive(safe, clock, target, 80)
    R_prev = DOWN
    for T in sent:
        assert rotation_angle_deg(T[:3, :3] @ R_prev.T) <= np.rad2deg(0.5 * DT) + 1e-6
        R_prev = T[:3, :3]
    trans_mm, rot_deg = pose_error(sent[-1], target)
    assert trans_mm < 1e-6 and rot_deg < 1e-6


def test_gripper_limits():
    safe, sim, clock = _arm(gripper_min=0.1, gripper_max=0.8)
    clock.advance(DT)
    report = safe.command_eef(make_T(DOWN, [0.5, 0.0, 0.3]), gripper=1.0)
    assert report.clipped_gripper and sim.read_state().gripper == pytest.approx(0.8)
    clock.advance(DT)
    safe.command_eef(make_T(DOWN, [0.5, 0.0, 0.3]), gripper=-1.0)
    assert sim.read_state().gripper == pytest.approx(0.1)


def test_stale_commands_hold_the_arm():
    safe, sim, clock = _arm(max_command_age_s=0.3)
    clock.advance(DT)
    assert safe.command_eef(make_T(DOWN, [0.55, 0.0, 0.3]), stamp=clock.t - 0.1).sent
    n = len(sim.commands)
    clock.advance(DT)
    report = safe.command_eef(make_T(DOWN, [0.6, 0.0, 0.3]), stamp=clock.t - 0.5)
    assert not report.sent and report.held.startswith("stale command")
    assert len(sim.commands) == n and sim.stops == 1 and safe.holding
    assert safe.counts.stale == 1


def test_motion_restarts_from_rest_at_the_measured_pose_after_a_hold():
    safe, sim, clock = _arm(max_linear_accel=1.0)
    _drive(safe, clock, make_T(DOWN, [0.7, 0.0, 0.3]), 10)
    safe.hold("operator pause")
    here = sim.read_state().T_base_eef
    clock.advance(DT)
    report = safe.command_eef(make_T(DOWN, [0.7, 0.0, 0.3]))
    # From rest: one step moves at most a dt^2.
    assert np.linalg.norm(report.T_sent[:3, 3] - here[:3, 3]) <= 1.0 * DT * DT + 1e-12


def test_watchdog_holds_when_commands_stop():
    safe, sim, clock = _arm(watchdog_s=0.3)
    _drive(safe, clock, make_T(DOWN, [0.6, 0.0, 0.3]), 3)
    clock.advance(0.2)
    assert not safe.check_watchdog() and sim.stops == 0
    clock.advance(0.2)
    assert safe.check_watchdog() and sim.stops == 1 and safe.holding
    assert not safe.check_watchdog()  # already holding: once is enough


def test_emergency_stop_latches_until_reset():
    safe, sim, clock = _arm()
    _drive(safe, clock, make_T(DOWN, [0.6, 0.0, 0.3]), 3)
    safe.emergency_stop("operator pressed e-stop")
    assert sim.estops == 1 and safe.emergency_stopped == "operator pressed e-stop"
    with pytest.raises(EmergencyStop, match="operator pressed"):
        safe.command_eef(make_T(DOWN, [0.6, 0.0, 0.3]))
    with pytest.raises(EmergencyStop):
        safe.command_joints(np.zeros(7))
    safe.reset_emergency_stop()
    clock.advance(DT)
    assert safe.command_eef(make_T(DOWN, [0.6, 0.0, 0.3])).sent


def test_measured_pose_outside_the_workspace_stops_everything():
    clock = ManualClock()
    sim = SimArm(make_T(DOWN, [1.5, 0.0, 0.3]), clock=clock)
    safe = SafeArm(sim, SafetyConfig(), clock=clock, watchdog=False)
    safe.connect()
    assert "outside the workspace" in safe.emergency_stopped and sim.estops == 1
    with pytest.raises(EmergencyStop):
        safe.command_eef(make_T(DOWN, [0.5, 0.0, 0.3]))


def test_joint_commands_are_limited():
    safe, sim, clock = _arm(
        max_joint_speed=0.5,
        max_joint_accel=100.0,
        joint_min=(-1.0,) * 7,
        joint_max=(1.0,) * 7,
    )
    for _ in range(60):
        clock.advance(DT)
        safe.command_joints(np.full(7, 3.0))
    q = [c[1] for c in sim.commands if c[0] == "joints"]
    steps = np.abs(np.diff(np.array([np.zeros(7)] + q), axis=0))
    assert steps.max() <= 0.5 * DT + 1e-12
    np.testing.assert_allclose(q[-1], np.ones(7))
    clock.advance(DT)
    assert safe.command_joints(np.zeros(3)).held.startswith("joint target has 3 joints")


def test_non_finite_targets_are_never_sent():
    safe, sim, clock = _arm()
    clock.advance(DT)
    T = make_T(DOWN, [0.5, 0.0, 0.3])
    T[0, 3] = np.nan
    assert not safe.command_eef(T).sent and not sim.commands


def test_safety_config_checks_itself():
    with pytest.raises(ValueError, match="below workspace_max"):
        SafetyConfig(workspace_min=(0.5, 0, 0), workspace_max=(0.4, 1, 1))
    with pytest.raises(ValueError, match="max_linear_speed must be positive"):
        SafetyConfig(max_linear_speed=0.0)


def test_watchdog_thread_starts_and_stops():
    sim = SimArm()
    safe = SafeArm(sim, SafetyConfig(watchdog_s=0.05))
    with safe:
        assert safe._watchdog_thread is not None and safe._watchdog_thread.is_alive()
    assert safe._watchdog_thread is None and not sim.connected


# --------------------------------------------------------------------------- UR backend


class _FakeRTDE:
    """Stands in for ur_rtde's control and receive interfaces; records calls."""

    def __init__(self, host, frequency=-1.0):
        self.host = host
        self.calls = []
        self.pose = [0.4, -0.1, 0.3, np.pi, 0.0, 0.0]
        _FakeRTDE.last = self

    def getActualTCPPose(self):
        return list(self.pose)

    def getActualQ(self):
        return [0.0, -1.57, 1.57, -1.57, -1.57, 0.0]

    def isProtectiveStopped(self):
        return False

    def isEmergencyStopped(self):
        return False

    def __getattr__(self, name):
        def record(*args):
            self.calls.append((name, args))
            return True

        return record


@pytest.fixture
def fake_rtde(monkeypatch):
    made = {}

    def factory(kind):
        def make(host, frequency=-1.0):
            made[kind] = _FakeRTDE(host, frequency)
            return made[kind]

        return make

    monkeypatch.setitem(
        sys.modules,
        "rtde_control",
        types.SimpleNamespace(RTDEControlInterface=factory("control")),
    )
    monkeypatch.setitem(
        sys.modules,
        "rtde_receive",
        types.SimpleNamespace(RTDEReceiveInterface=factory("receive")),
    )
    return made


def test_ur_arm_speaks_rtde_poses(fake_rtde):
    from envs.ur_arm import T_to_pose, URArm, pose_to_T

    arm = URArm("192.168.1.20", servo_time_s=0.1, lookahead_s=0.05, gain=400)
    with arm:
        state = arm.read_state()
        np.testing.assert_allclose(state.T_base_eef[:3, 3], [0.4, -0.1, 0.3])
        np.testing.assert_allclose(state.T_base_eef[:3, :3], np.diag([1.0, -1.0, -1.0]), atol=1e-12)
        target = make_T(rotvec_to_matrix([0.0, 0.0, 0.3]) @ DOWN, [0.45, 0.0, 0.25])
        arm.command_eef(target)
        name, args = fake_rtde["control"].calls[-1]
        assert name == "servoL"
        np.testing.assert_allclose(pose_to_T(args[0]), target, atol=1e-12)
        assert args[1:] == (0.0, 0.0, 0.1, 0.05, 400)
        arm.command_joints(np.zeros(6))
        assert fake_rtde["control"].calls[-1][0] == "servoJ"
        arm.stop()
        assert fake_rtde["control"].calls[-1][0] == "servoStop"
        arm.emergency_stop()
        assert fake_rtde["control"].calls[-1][0] == "triggerProtectiveStop"
    names = [c[0] for c in fake_rtde["control"].calls]
    assert names[-3:] == ["servoStop", "stopScript", "disconnect"]
    # Round trip of the pose conversion, including a rotation near a half turn.
    pose = [0.1, 0.2, 0.3, 0.0, 3.1, 0.1]
    np.testing.assert_allclose(T_to_pose(pose_to_T(pose)), pose, atol=1e-9)


def test_ur_behind_the_safety_layer(fake_rtde):
    from envs.ur_arm import URArm, pose_to_T

    clock = ManualClock()
    arm = SafeArm(
        URArm("10.0.0.2"), SafetyConfig(max_linear_speed=0.1), clock=clock, watchdog=False
    )
    with arm:
        clock.advance(0.1)
        arm.command_eef(make_T(DOWN, [0.8, -0.1, 0.3]))
        sent = pose_to_T(fake_rtde["control"].calls[-1][1][0])
    assert np.linalg.norm(sent[:3, 3] - [0.4, -0.1, 0.3]) <= 0.1 * 0.1 + 1e-12


def test_missing_ur_rtde_names_the_extra():
    code = (
        "import sys; sys.modules['rtde_control'] = None\n"
        "from envs.ur_arm import URArm\n"
        "try:\n    URArm('1.2.3.4').connect()\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'mu0[ur]'" in out.stdout


def test_robotiq_gripper_socket_protocol():
    from envs.ur_arm import RobotiqGripper

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    state = {"ACT": 0, "STA": 0, "POS": 0}
    received = []

    def serve():
        conn, _ = server.accept()
        with conn:
            buf = b""
            while True:
                data = conn.recv(1024)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    words = line.decode().split()
                    received.append(" ".join(words))
                    if words[0] == "SET":
                        state[words[1]] = int(words[2])
                        if words[1] == "ACT":
                            state["STA"] = 3
                        conn.sendall(b"ack")
                    else:
                        conn.sendall(f"{words[1]} {state.get(words[1], 0)}".encode())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    g = RobotiqGripper("127.0.0.1", port=port, speed=200, force=50)
    g.connect()
    g.move(0.5)
    g.move(0.5)  # unchanged: not sent again
    assert g.position() == pytest.approx(128 / 255)
    g.disconnect()
    t.join(timeout=2)
    server.close()
    assert received[:3] == ["GET ACT", "SET ACT 1", "GET STA"]
    assert "SET SPE 200" in received and "SET FOR 50" in received
    assert received.count("SET POS 128") == 1
