"""Universal Robots arms (UR3e/UR5e/UR10e, CB3) through ur_rtde, and a Robotiq gripper.

`URArm` implements `envs.arm.Arm` with ur_rtde's RTDE interfaces: poses from
``getActualTCPPose`` (the TCP set on the teach pendant, in the robot's base frame, as
x, y, z, rx, ry, rz with a rotation vector), targets through ``servoL``/``servoJ`` (the
controller interpolates over ``servo_time_s`` with a look-ahead), ``servoStop`` to hold,
``triggerProtectiveStop`` for an emergency stop. Always command it through
`envs.arm.SafeArm`.

Frames: UR's "base" frame (the one getActualTCPPose reports) is rotated 180° about z from
ROS's ``base_link``; calibrate and configure the workspace box in the frame the robot
reports, which is what this backend reads and commands.

Needs the `ur` extra: pip install 'mu0[ur]' (ur_rtde). The robot must be in remote
control with the RTDE control script allowed (ur_rtde uploads it), or run ur_rtde's URCap.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import numpy as np

from calibration.transforms import make_T, matrix_to_rotvec, rotvec_to_matrix
from envs.arm import Arm, ArmState

UR_EXTRA_HINT = "pip install 'mu0[ur]'"

log = logging.getLogger("mu0.ur")


def import_rtde() -> tuple[Any, Any]:
    """(rtde_control, rtde_receive), or an ImportError naming the extra."""
    try:
        import rtde_control
        import rtde_receive
    except ImportError as e:
        raise ImportError(f"UR arms need ur_rtde: {UR_EXTRA_HINT} ({e})") from e
    return rtde_control, rtde_receive


def pose_to_T(pose: list[float] | np.ndarray) -> np.ndarray:
    """UR pose [x, y, z, rx, ry, rz] (metres, rotation vector) -> float64[4, 4]."""
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape != (6,):
        raise ValueError(f"a UR pose has 6 numbers, got {pose.shape}")
    return make_T(rotvec_to_matrix(pose[3:]), pose[:3])


def T_to_pose(T: np.ndarray) -> list[float]:
    """float64[4, 4] -> UR pose [x, y, z, rx, ry, rz]."""
    return [float(x) for x in (*T[:3, 3], *matrix_to_rotvec(T[:3, :3]))]


class RobotiqGripper:
    """A Robotiq 2F gripper through its URCap's socket (port 63352 on the robot).

    Positions 0..255 in Robotiq's units (0 open, 255 closed) map to 0..1 here.
    """

    def __init__(
        self,
        host: str,
        port: int = 63352,
        speed: int = 255,
        force: int = 100,
        timeout_s: float = 2.0,
    ) -> None:
        self.host, self.port = host, port
        self.speed, self.force = int(speed), int(force)
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._last_sent: int | None = None

    def connect(self) -> None:
        self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        if self._get("ACT") != 1:
            self._set("ACT", 1)
            deadline = time.monotonic() + 5.0
            while self._get("STA") != 3:  # 3: activation complete
                if time.monotonic() > deadline:
                    raise TimeoutError("the Robotiq gripper did not finish activating in 5 s")
                time.sleep(0.05)
        self._set("GTO", 1)
        self._set("SPE", self.speed)
        self._set("FOR", self.force)

    def disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def position(self) -> float:
        return self._get("POS") / 255.0

    def move(self, closed_fraction: float) -> None:
        pos = int(round(np.clip(closed_fraction, 0.0, 1.0) * 255))
        if pos != self._last_sent:  # the loop commands every tick; the gripper needs it once
            self._set("POS", pos)
            self._last_sent = pos

    def _command(self, text: str) -> str:
        if self._sock is None:
            raise RuntimeError("gripper not connected")
        self._sock.sendall((text + "\n").encode())
        reply = self._sock.recv(1024).decode().strip()
        return reply

    def _set(self, var: str, value: int) -> None:
        reply = self._command(f"SET {var} {value}")
        if reply != "ack":
            raise RuntimeError(f"Robotiq gripper refused SET {var} {value}: {reply!r}")

    def _get(self, var: str) -> int:
        reply = self._command(f"GET {var}")
        name, _, value = reply.partition(" ")
        if name != var:
            raise RuntimeError(f"Robotiq gripper answered {reply!r} to GET {var}")
        return int(value)


class URArm(Arm):
    """A UR arm over RTDE.

    Args:
        host: the robot's IP address.
        frequency: RTDE rate in Hz (500 for e-series, 125 for CB3).
        servo_time_s: the time each servo target is given to be reached; set it to the
            control loop's period.
        lookahead_s, gain: ur_rtde's servo smoothing (0.03–0.2 s; 100–2000).
        gripper: a `RobotiqGripper` (or anything with connect/disconnect/position/move),
            or None for no gripper (gripper commands are then ignored).
    """

    name = "ur"
    num_joints = 6

    def __init__(
        self,
        host: str,
        frequency: float = 500.0,
        servo_time_s: float = 0.1,
        lookahead_s: float = 0.1,
        gain: float = 300.0,
        gripper: Any = None,
    ) -> None:
        self.host = host
        self.frequency = frequency
        self.servo_time_s = servo_time_s
        self.lookahead_s = lookahead_s
        self.gain = gain
        self.gripper = gripper
        self._ctrl: Any = None
        self._recv: Any = None

    def connect(self) -> None:
        rtde_control, rtde_receive = import_rtde()
        try:
            self._recv = rtde_receive.RTDEReceiveInterface(self.host, self.frequency)
            self._ctrl = rtde_control.RTDEControlInterface(self.host, self.frequency)
        except RuntimeError as e:
            raise RuntimeError(
                f"could not reach the UR controller at {self.host}: {e} (is the robot on, in "
                "remote control, and reachable from this machine?)"
            ) from e
        if self.gripper is not None:
            self.gripper.connect()
        log.info("connected to UR at %s", self.host)

    def disconnect(self) -> None:
        if self._ctrl is not None:
            try:
                self._ctrl.servoStop()
                self._ctrl.stopScript()
            finally:
                self._ctrl.disconnect()
                self._ctrl = None
        if self._recv is not None:
            self._recv.disconnect()
            self._recv = None
        if self.gripper is not None:
            self.gripper.disconnect()

    def _require(self) -> None:
        if self._ctrl is None or self._recv is None:
            raise RuntimeError("URArm is not connected")

    def read_state(self) -> ArmState:
        self._require()
        if self._recv.isProtectiveStopped() or self._recv.isEmergencyStopped():
            raise RuntimeError("the UR controller is protective- or emergency-stopped")
        T = pose_to_T(self._recv.getActualTCPPose())
        q = np.asarray(self._recv.getActualQ(), dtype=np.float64)
        gripper = self.gripper.position() if self.gripper is not None else 0.0
        return ArmState(T, q, float(gripper), time.monotonic())

    def command_eef(self, T_base_eef: np.ndarray, gripper: float | None = None) -> None:
        self._require()
        # speed and acceleration are unused by servoL; time/lookahead/gain shape the motion.
        ok = self._ctrl.servoL(
            T_to_pose(T_base_eef), 0.0, 0.0, self.servo_time_s, self.lookahead_s, self.gain
        )
        if ok is False:
            raise RuntimeError("servoL was refused by the UR controller")
        self._grip(gripper)

    def command_joints(self, q: np.ndarray, gripper: float | None = None) -> None:
        self._require()
        q = [float(x) for x in np.asarray(q, dtype=np.float64)]
        if len(q) != self.num_joints:
            raise ValueError(f"a UR arm has 6 joints, got {len(q)}")
        ok = self._ctrl.servoJ(q, 0.0, 0.0, self.servo_time_s, self.lookahead_s, self.gain)
        if ok is False:
            raise RuntimeError("servoJ was refused by the UR controller")
        self._grip(gripper)

    def stop(self) -> None:
        self._require()
        self._ctrl.servoStop()

    def emergency_stop(self) -> None:
        if self._ctrl is not None:
            self._ctrl.triggerProtectiveStop()

    def _grip(self, gripper: float | None) -> None:
        if gripper is not None and self.gripper is not None:
            self.gripper.move(gripper)
