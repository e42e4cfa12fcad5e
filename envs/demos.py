"""Scripted demonstrators: state machines over end-effector targets, one per task.

Each demonstrator reads ground truth (object poses, the door's joints) from the
simulator and servoes the grip site to a target pose through OSC_POSE deltas, so the
same script drives every robot (Panda, UR5e, Kinova3, IIWA). They exist to record
demonstrations and to give the trace pipeline episodes with known outcomes.

    demo = make_demonstrator("Lift")
    obs, info = env.reset(seed=0)
    while not info["success"]:
        obs, reward, terminated, truncated, info = env.step(demo(env))

Where an object allows several grasps (a cube every quarter turn, a can at any yaw, a
door lever from a few directions), the demonstrator takes one the arm can follow
through the whole task, checked beforehand with inverse kinematics on a scratch copy of
the simulation (``ArmKinematics``): reachable, clear of joint limits, the open hand clear
of everything but the object. Grasps that come away empty are retried.

Run `python -m envs.demos --episodes 50` to measure success per task × robot (no
images are rendered: the physics is the same and it is ~7x faster).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import numpy as np

try:
    import mujoco
    import robosuite.utils.transform_utils as rs_transforms
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError(f"envs.demos needs robosuite and mujoco: pip install 'mu0[sim]' ({e})") from e

from envs import MAX_EPISODE_STEPS, ROBOTS, TASKS
from envs.robosuite_env import RobosuiteTraceEnv

# Grip site pointing down (its z along world -z), fingers closing along a world
# horizontal axis: near the rest pose of the grippers (the Panda's is a quarter turn
# about the vertical from it; grasps are chosen among equivalent turns, see below).
R_WORLD_DOWN = np.diag([1.0, -1.0, -1.0])

OPEN, CLOSE = -1.0, 1.0
# OSC_POSE scales an action of 1 to 5 cm or 0.5 rad (robosuite's BASIC config).
_POS_PER_ACTION_M, _ROT_PER_ACTION_RAD = 0.05, 0.5

Demonstrator = Callable[[Any], np.ndarray]


def _rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _yaw(R: np.ndarray) -> float:
    return float(np.arctan2(R[1, 0], R[0, 0]))


def _yaw_between(a: np.ndarray, b: np.ndarray) -> float:
    """Rotation about world z taking the horizontal part of `a` onto that of `b`."""
    return float(np.arctan2(b[1], b[0]) - np.arctan2(a[1], a[0]))


def _axis_angle_matrix(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation by `angle` about the unit vector `axis` (right-handed)."""
    return rs_transforms.quat2mat(rs_transforms.axisangle2quat(np.asarray(axis) * angle))


def _rotation_angle(R: np.ndarray) -> float:
    return float(np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)))


def _unwrap_env(env: Any) -> RobosuiteTraceEnv:
    inner = getattr(env, "unwrapped", env)
    if not isinstance(inner, RobosuiteTraceEnv):
        raise TypeError(
            f"demonstrators read ground truth from a RobosuiteTraceEnv, got {type(inner)}"
        )
    return inner


class ArmKinematics:
    """Inverse kinematics and collision checks for the arm on a scratch copy of the model.

    The live simulation is never touched. A demonstrator uses it to choose, among grasps
    that would all do, one whose whole planned motion the arm can follow: reachable, inside
    the joint limits, and without the hand or arm running into itself or the scene.
    """

    # The open hand should pass at least this far from anything it is not meant to touch:
    # the arm follows its targets to within a few millimetres, not exactly.
    hand_clearance_m = 0.008

    def __init__(self, env: RobosuiteTraceEnv) -> None:
        robot = env.robosuite_env.robots[0]
        model = copy.deepcopy(env.sim.model._model)
        self.model, self.data = model, mujoco.MjData(model)
        self.data.qpos[:] = env.sim.data.qpos
        self.qpos_idx = np.asarray(env._joint_qpos_idx)
        self.dof_idx = np.asarray(robot._ref_joint_vel_indexes)
        self.site = env._eef_site_id
        joints = [model.joint(name).id for name in robot.robot_joints]
        limited = model.jnt_limited[joints].astype(bool)
        self.low = np.where(limited, model.jnt_range[joints, 0], -np.inf)
        self.high = np.where(limited, model.jnt_range[joints, 1], np.inf)
        self.rest = np.asarray(robot.init_qpos, dtype=np.float64)
        root = model.body_rootid[env._base_body_id]
        self.robot_body = model.body_rootid == root
        gripper_prefix = robot.gripper[env._arm].naming_prefix
        self.gripper_body = np.array(
            [(model.body(b).name or "").startswith(gripper_prefix) for b in range(model.nbody)]
        )
        # Contacts are reported from this far apart for the hand's geoms (scratch model only).
        hand_geoms = self.gripper_body[model.geom_bodyid]
        model.geom_margin[hand_geoms] = np.maximum(
            model.geom_margin[hand_geoms], self.hand_clearance_m
        )

    def set_qpos(self, addr_values: dict[int, float]) -> None:
        """Set other joints of the scratch state (a door's hinge, say) by qpos address."""
        for addr, value in addr_values.items():
            self.data.qpos[addr] = value

    def solve(
        self, pos: np.ndarray, R: np.ndarray, q_start: np.ndarray, iters: int = 80
    ) -> tuple[np.ndarray, float, float]:
        """Arm joints putting the grip site at (pos, R), found from q_start; and the
        remaining (position m, rotation rad) errors. Damped least squares, with a pull
        toward the rest posture in the null space (as the OSC controller's posture term)."""
        m, d = self.model, self.data
        q = q_start.copy()
        jacp, jacr = np.zeros((3, m.nv)), np.zeros((3, m.nv))
        pos_err = rot_err = np.inf
        for _ in range(iters):
            d.qpos[self.qpos_idx] = q
            mujoco.mj_kinematics(m, d)
            mujoco.mj_comPos(m, d)
            R_now = d.site_xmat[self.site].reshape(3, 3)
            e_pos = pos - d.site_xpos[self.site]
            e_rot = rs_transforms.quat2axisangle(rs_transforms.mat2quat(R @ R_now.T))
            pos_err, rot_err = float(np.linalg.norm(e_pos)), float(np.linalg.norm(e_rot))
            if pos_err < 1e-3 and rot_err < 5e-3:
                break
            mujoco.mj_jacSite(m, d, jacp, jacr, self.site)
            J = np.vstack([jacp, jacr])[:, self.dof_idx]
            JJt = J @ J.T + 1e-4 * np.eye(6)
            dq = J.T @ np.linalg.solve(JJt, np.concatenate([e_pos, e_rot]))
            null = np.eye(len(q)) - J.T @ np.linalg.solve(JJt, J)
            dq = dq + null @ (0.1 * (self.rest - q))
            step = float(np.max(np.abs(dq)))
            if step > 0.2:
                dq *= 0.2 / step
            q = np.clip(q + dq, self.low, self.high)
        return q, pos_err, rot_err

    def limit_margin(self, q: np.ndarray) -> float:
        """Smallest distance (rad) of a limited joint from its limit."""
        margin = np.minimum(q - self.low, self.high - q)
        return float(np.min(margin[np.isfinite(margin)], initial=np.pi))

    def slack(self, q: np.ndarray, allowed_bodies: np.ndarray | None = None) -> float:
        """How much room the robot at joints q has (m); negative: it collides.

        The hand should stay `hand_clearance_m` away from the scene, the arm may touch it
        by 2 mm at most. Contacts inside the hand, and between the hand and
        `allowed_bodies` (bool[nbody], what it is meant to hold), do not count.
        """
        m, d = self.model, self.data
        d.qpos[self.qpos_idx] = q
        mujoco.mj_fwdPosition(m, d)
        slack = np.inf
        for c in d.contact[: d.ncon]:
            b1, b2 = m.geom_bodyid[c.geom1], m.geom_bodyid[c.geom2]
            if not (self.robot_body[b1] or self.robot_body[b2]):
                continue
            hand1, hand2 = self.gripper_body[b1], self.gripper_body[b2]
            if hand1 and hand2:
                continue
            if allowed_bodies is not None and (
                (hand1 and allowed_bodies[b2]) or (hand2 and allowed_bodies[b1])
            ):
                continue
            slack = min(slack, c.dist - self.hand_clearance_m if hand1 or hand2 else c.dist + 0.002)
        return float(slack)


class ScriptedDemonstrator:
    """Base: phase bookkeeping and a pose servo; subclasses write `_act`.

    Call it with the env (or a gymnasium wrapper of it) after each reset/step; it
    starts over by itself when the env has just been reset.
    """

    task: str = ""

    def __init__(self, max_step_m: float = 0.02, max_step_rad: float = 0.15) -> None:
        self.max_step_m = max_step_m
        self.max_step_rad = max_step_rad
        self.reset()

    def reset(self) -> None:
        self.phase = "start"
        self.phase_steps = 0
        self.memory: dict[str, Any] = {}

    def __call__(self, env_or_wrapper: Any) -> np.ndarray:
        env = _unwrap_env(env_or_wrapper)
        if env.robosuite_env.timestep == 0 and self.phase_steps != 0:
            self.reset()
        phase = self.phase
        action = self._act(env)
        self.phase_steps = self.phase_steps + 1 if self.phase == phase else 0
        return action

    def _goto(self, phase: str) -> None:
        self.phase = phase

    def closing_axis_eef(self, env: RobosuiteTraceEnv) -> np.ndarray:
        """Unit vector, in the grip-site frame, along which the fingers close.

        Measured from the finger pads rather than assumed: it differs between hands.
        """
        if "closing_axis_eef" not in self.memory:
            sim = env.sim
            geoms = env.robosuite_env.robots[0].gripper[env._arm].important_geoms
            left = sim.data.geom_xpos[sim.model.geom_name2id(geoms["left_fingerpad"][0])]
            right = sim.data.geom_xpos[sim.model.geom_name2id(geoms["right_fingerpad"][0])]
            axis = env.T_world_eef()[:3, :3].T @ (left - right)
            self.memory["closing_axis_eef"] = axis / np.linalg.norm(axis)
        return self.memory["closing_axis_eef"]

    def gripper_settled(self, env: RobosuiteTraceEnv, min_steps: int = 8) -> bool:
        """True once the fingers have stopped moving (Robotiq hands close slowly)."""
        q = env.sim.data.qpos[env._gripper_qpos_idx].copy()
        q_prev = self.memory.get("gripper_q_prev")
        self.memory["gripper_q_prev"] = q
        if self.phase_steps >= 40:
            return True
        moving = q_prev is None or np.max(np.abs(q - q_prev)) > 2e-3
        return self.phase_steps >= min_steps and not moving

    def _act(self, env: RobosuiteTraceEnv) -> np.ndarray:
        raise NotImplementedError

    def servo(
        self,
        env: RobosuiteTraceEnv,
        pos_world: np.ndarray,
        R_world: np.ndarray,
        gripper: float,
        max_step_m: float | None = None,
    ) -> tuple[np.ndarray, float]:
        """Action moving the grip site toward a world pose; also the position error (m)."""
        T_world_eef = env.T_world_eef()
        R_world_base = env.T_world_base()[:3, :3]
        dpos_world = pos_world - T_world_eef[:3, 3]
        err_m = float(np.linalg.norm(dpos_world))
        step_m = max_step_m or self.max_step_m
        if err_m > step_m:
            dpos_world = dpos_world * (step_m / err_m)
        # Orientation error as a world-frame rotation vector (R_target · R_current^T).
        R_err = R_world @ T_world_eef[:3, :3].T
        drot_world = rs_transforms.quat2axisangle(rs_transforms.mat2quat(R_err))
        rot_rad = float(np.linalg.norm(drot_world))
        self.last_rot_err_rad = rot_rad
        if rot_rad > self.max_step_rad:
            drot_world = drot_world * (self.max_step_rad / rot_rad)
        # OSC_POSE takes deltas in the robot base frame.
        action = np.concatenate(
            [
                R_world_base.T @ dpos_world / _POS_PER_ACTION_M,
                R_world_base.T @ drot_world / _ROT_PER_ACTION_RAD,
                [gripper],
            ]
        )
        return np.clip(action, -1.0, 1.0).astype(np.float32), err_m


class PickAndPlace(ScriptedDemonstrator):
    """Grasp an object from above, carry it over a goal, lower it, let go, back off.

    Subclasses say which object, which grasps hold it and where it goes. Of the grasps,
    the demonstrator takes one the arm can follow through the whole task (inverse
    kinematics on a scratch copy: reachable, clear of the joint limits, the open fingers
    clear of everything but the object). A grasp that comes away empty, or an object that
    slips out on the way, sends the hand back for another grasp (`max_grasps` in all).
    Started with the object already between its fingers (another policy brought the scene
    there), it keeps that grasp and carries on from the lift.
    """

    hover_m = 0.10  # approach height above the grasp point
    carry_height_m = 0.12  # clearance of the object's centre over the place point
    max_grasps = 3
    # How far the object may be from where the hand held it before it counts as dropped (m).
    slip_m = 0.04

    def object_body(self, env: RobosuiteTraceEnv) -> int:
        raise NotImplementedError

    def object_pose(self, env: RobosuiteTraceEnv) -> tuple[np.ndarray, np.ndarray]:
        body, data = self.object_body(env), env.sim.data
        return data.body_xpos[body].copy(), data.body_xmat[body].reshape(3, 3).copy()

    def grasp_offset_m(self, env: RobosuiteTraceEnv) -> np.ndarray:
        """Grip site position relative to the object centre at the grasp (world axes)."""
        return np.zeros(3)

    def place_point(self, env: RobosuiteTraceEnv) -> np.ndarray | None:
        """Where the object's centre goes; None to just lift it."""
        return None

    def grasp_candidates(self, env: RobosuiteTraceEnv) -> list[np.ndarray]:
        """Grip rotations that would all hold the object."""
        return [R_WORLD_DOWN]

    def travel_height(self, env: RobosuiteTraceEnv) -> float | None:
        """Move sideways only above this height (world z, m); None: nothing is in the way."""
        return None

    def place_rotation(self, env: RobosuiteTraceEnv, R_grasp: np.ndarray) -> np.ndarray:
        """The hand's rotation while carrying and placing; by default the grasp's."""
        return R_grasp

    # -- choosing a grasp ------------------------------------------------------------------

    def _plan_score(
        self, env: RobosuiteTraceEnv, ik: ArmKinematics, R: np.ndarray
    ) -> tuple[float, ...]:
        """How well the arm can follow one grasp through the task (lower is better)."""
        obj_pos, _ = self.object_pose(env)
        offset = self.grasp_offset_m(env)
        grasp = obj_pos + offset
        place = self.place_point(env)
        lift_z = (place[2] if place is not None else obj_pos[2]) + self.carry_height_m
        # (position, rotation, whether the open hand must be clear of the scene there)
        waypoints = [(grasp + [0, 0, self.hover_m], R, True), (grasp, R, True)]
        waypoints.append((np.array([*grasp[:2], lift_z]), R, False))
        if place is not None:
            R_place = self.place_rotation(env, R)
            obj_in_eef = R.T @ -offset
            above = np.array([*place[:2], place[2] + self.carry_height_m])
            waypoints.append((above - R_place @ obj_in_eef, R_place, False))
            waypoints.append((place - R_place @ obj_in_eef, R_place, False))
        holdable = np.zeros(ik.model.nbody, bool)
        holdable[self.object_body(env)] = True
        q = env.sim.data.qpos[ik.qpos_idx].copy()
        pos_err = rot_err = 0.0
        margin = slack = np.inf
        for pos, R_waypoint, check in waypoints:
            q, p_err, r_err = ik.solve(pos, R_waypoint, q)
            pos_err, rot_err = max(pos_err, p_err), max(rot_err, r_err)
            margin = min(margin, ik.limit_margin(q))
            if check:
                slack = min(slack, ik.slack(q, holdable))
        feasible = pos_err < 0.005 and rot_err < 0.05 and slack >= 0 and margin > 0.1
        turn = _rotation_angle(R @ env.T_world_eef()[:3, :3].T)
        # Among plans with room at every joint, the least turning of the hand.
        return (float(not feasible), -min(slack, 0.0), max(0.3 - margin, 0.0), turn, pos_err)

    def _choose_grasp(self, env: RobosuiteTraceEnv) -> None:
        ik = ArmKinematics(env)
        candidates = self.grasp_candidates(env)
        scores = [self._plan_score(env, ik, R) for R in candidates]
        self.memory["R_grasp"] = candidates[min(range(len(candidates)), key=scores.__getitem__)]

    # -- holding ---------------------------------------------------------------------------

    def _eef_for_object_at(self, obj_pos: np.ndarray, R_eef: np.ndarray) -> np.ndarray:
        """Grip site position that puts the held object's centre at `obj_pos`."""
        return obj_pos - R_eef @ self.memory["obj_in_eef"]

    def _holding(self, env: RobosuiteTraceEnv, obj_pos: np.ndarray) -> bool:
        """The object still sits in the hand where it was grasped."""
        T = env.T_world_eef()
        expected = T[:3, 3] + T[:3, :3] @ self.memory["obj_in_eef"]
        return float(np.linalg.norm(obj_pos - expected)) < self.slip_m

    def object_in_hand(self, env: RobosuiteTraceEnv) -> bool:
        """Both finger pads touch the object (robosuite's own grasp check)."""
        rs_env, model = env.robosuite_env, env.sim.model
        geoms = [
            model.geom_id2name(g)
            for g in np.flatnonzero(model.geom_bodyid == self.object_body(env))
        ]
        gripper = rs_env.robots[0].gripper[env._arm]
        return bool(rs_env._check_grasp(gripper=gripper, object_geoms=[g for g in geoms if g]))

    def _regrasp(self) -> None:
        """Open, back off upward and try again from the hover pose, while tries are left."""
        self.memory["grasps"] = self.memory.get("grasps", 1) + 1
        for key in ("lift_target", "R_place", "R_rise", "eef_prev", "lower_from_z"):
            self.memory.pop(key, None)
        self._goto("back_off" if self.memory["grasps"] <= self.max_grasps else "give_up")

    def _act(self, env: RobosuiteTraceEnv) -> np.ndarray:
        obj_pos, _ = self.object_pose(env)
        T_world_eef = env.T_world_eef()
        eef_pos = T_world_eef[:3, 3]
        if self.phase == "start" and self.object_in_hand(env):
            # Picked up mid-task (another policy brought the scene here): keep the grasp
            # the hand has and carry on from the lift.
            self.memory["R_grasp"] = T_world_eef[:3, :3].copy()
            self.memory["obj_in_eef"] = T_world_eef[:3, :3].T @ (obj_pos - eef_pos)
            self.memory["eef_z_grasped"] = float(eef_pos[2])
            self._goto("lift")
        if self.phase == "start":
            self.memory["hold"] = T_world_eef.copy()
            travel_z = self.travel_height(env)
            if travel_z is not None and eef_pos[2] < travel_z:
                self.memory["hold"][2, 3] = travel_z + 0.02
            self._goto("open")
        if self.phase == "open":
            # Rise clear of walls if need be, then open the hand where it is: the object may
            # be right beside the fingers, and the grasp is chosen with the fingers open.
            hold = self.memory["hold"]
            risen = eef_pos[2] > hold[2, 3] - 0.01
            action, _ = self.servo(env, hold[:3, 3], hold[:3, :3], OPEN if risen else 0.0)
            if risen and (self.gripper_settled(env, min_steps=4) or self.phase_steps > 50):
                self._choose_grasp(env)
                self._goto("hover")
            return action
        R = self.memory["R_grasp"]
        grasp_pos = obj_pos + self.grasp_offset_m(env)

        if self.phase == "give_up":
            action, _ = self.servo(env, self.memory.setdefault("rest", eef_pos.copy()), R, OPEN)
            return action
        if self.phase == "back_off":
            target = self.memory.setdefault("back_off_target", eef_pos + [0, 0, 0.06])
            action, err = self.servo(env, target, R, OPEN)
            if (err < 0.01 and self.gripper_settled(env)) or self.phase_steps > 40:
                self.memory.pop("back_off_target")
                self._choose_grasp(env)
                self._goto("hover")
            return action
        if self.phase == "hover":
            target, R_hover = grasp_pos + [0, 0, self.hover_m], R
            travel_z = self.travel_height(env)
            far = np.linalg.norm(target[:2] - eef_pos[:2]) > 0.02
            if travel_z is not None and far and eef_pos[2] < travel_z:
                # Over the walls before turning the hand or moving sideways.
                target = np.array([*eef_pos[:2], max(target[2], travel_z + 0.02)])
                R_hover = self.memory.setdefault("R_rise", T_world_eef[:3, :3].copy())
            action, err = self.servo(env, target, R_hover, OPEN)
            # Already over the grasp, below the hover height (the hand was left there):
            # go down from where it is.
            in_column = (
                np.linalg.norm(grasp_pos[:2] - eef_pos[:2]) < 0.01
                and grasp_pos[2] < eef_pos[2] < target[2]
            )
            # Turn the hand fully before going down, or the descent drifts sideways.
            aligned = (err < 0.01 or in_column) and self.last_rot_err_rad < 0.05
            if aligned or self.phase_steps > 80:
                self._goto("descend")
            return action
        if self.phase == "descend":
            target = grasp_pos.copy()
            xy_err = float(np.linalg.norm(grasp_pos[:2] - eef_pos[:2]))
            hold_z = self.memory.setdefault("descend_from_z", float(eef_pos[2]))
            xy_err_0 = self.memory.setdefault("descend_from_xy_err", xy_err)
            held = self.memory.get("descend_held", 0)
            if xy_err > xy_err_0 + 0.008 and held < 12:
                # Some arms drift sideways on the way down: stop going down until back over
                # the grasp, or the open fingers land on the object. At the edge of its
                # reach an arm may not get back: after a while, go down anyway.
                target[2] = max(target[2], min(hold_z, eef_pos[2]))
                self.memory["descend_held"] = held + 1
            action, err = self.servo(env, target, R, OPEN, max_step_m=0.01)
            if err < 0.005 or self.phase_steps > 60:
                self.memory.pop("descend_from_z")
                self.memory.pop("descend_from_xy_err")
                self.memory.pop("descend_held", None)
                self._goto("close")
            return action
        if self.phase == "close":
            action, _ = self.servo(env, grasp_pos, R, CLOSE)
            if self.gripper_settled(env):
                # Carry the object by where it actually sits in the hand.
                self.memory["obj_in_eef"] = T_world_eef[:3, :3].T @ (obj_pos - eef_pos)
                self.memory["eef_z_grasped"] = float(eef_pos[2])
                self._goto("lift")
            return action

        place = self.place_point(env)
        if self.phase == "lift":
            lift_z = (place[2] if place is not None else obj_pos[2]) + self.carry_height_m
            target = self.memory.setdefault("lift_target", np.array([*eef_pos[:2], lift_z]))
            action, err = self.servo(env, target, R, CLOSE)
            # An empty grasp shows once the hand has risen and the object has not.
            risen = eef_pos[2] - self.memory["eef_z_grasped"]
            if risen > 0.05 and not self._holding(env, obj_pos):
                self._regrasp()
                return action
            if place is None:
                return action
            if err < 0.02 or self.phase_steps > 60:
                self._goto("carry")
            return action
        assert place is not None
        if self.phase in ("carry", "lower") and not self._holding(env, obj_pos):
            self._regrasp()
            return self.servo(env, eef_pos, R, OPEN)[0]
        R_place = self.memory.setdefault("R_place", self.place_rotation(env, R))
        if self.phase == "carry":
            above = np.array([*place[:2], place[2] + self.carry_height_m])
            target = self._eef_for_object_at(above, R_place)
            action, err = self.servo(env, target, R_place, CLOSE, max_step_m=0.04)
            obj_err_xy = np.linalg.norm(obj_pos[:2] - place[:2])
            # Arrived and stopped: a fast arm carries on past the goal for a few steps.
            speed = np.linalg.norm(eef_pos - self.memory.get("eef_prev", eef_pos))
            self.memory["eef_prev"] = eef_pos.copy()
            if (err < 0.015 and obj_err_xy < 0.015 and speed < 0.0015) or self.phase_steps > 120:
                self._goto("lower")
            return action
        if self.phase == "lower":
            target = self._eef_for_object_at(place, R_place)
            hold_z = self.memory.setdefault("lower_from_z", float(eef_pos[2]))
            if np.linalg.norm(obj_pos[:2] - place[:2]) > 0.01:
                # Over the goal first, then down: no lower than this while the object is off.
                target[2] = max(target[2], min(hold_z, eef_pos[2]))
            action, err = self.servo(env, target, R_place, CLOSE, max_step_m=0.01)
            if err < 0.006 or self.phase_steps > 60:
                self._goto("release")
            return action
        if self.phase == "release":
            action, _ = self.servo(env, eef_pos, R_place, OPEN)
            if self.gripper_settled(env):
                self.memory["retreat"] = eef_pos + [0, 0, 0.12]
                self._goto("retreat")
            return action
        action, _ = self.servo(env, self.memory["retreat"], R_place, OPEN)
        return action


def _quarter_turns(yaw: float) -> list[np.ndarray]:
    """The four pointing-down grip rotations a quarter turn apart, starting at `yaw`."""
    return [_rot_z(yaw + k * np.pi / 2) @ R_WORLD_DOWN for k in range(4)]


class LiftDemonstrator(PickAndPlace):
    task = "Lift"

    def object_body(self, env):
        return env.robosuite_env.cube_body_id

    def grasp_candidates(self, env):
        # A cube is held the same way every quarter turn about its vertical axis.
        return _quarter_turns(_yaw(self.object_pose(env)[1]))


class StackDemonstrator(LiftDemonstrator):
    task = "Stack"
    carry_height_m = 0.08

    def object_body(self, env):
        return env.robosuite_env.cubeA_body_id

    def place_point(self, env):
        rs_env = env.robosuite_env
        cube_green = env.sim.data.body_xpos[rs_env.cubeB_body_id]
        half_red = rs_env.cubeA.size[2]
        half_green = rs_env.cubeB.size[2]
        # Let go a few mm above contact: the red cube settles onto the green one.
        return cube_green + [0, 0, half_green + half_red + 0.004]


class PickPlaceCanDemonstrator(PickAndPlace):
    task = "PickPlaceCan"
    carry_height_m = 0.09  # over the release height: the can's bottom clears the walls by ~5 cm
    wall_height_m = 0.10  # the bins' walls and dividers rise this far above the bin's origin
    # Tilting the hand outward (fingertips away from the base) moves the wrist back toward
    # the base for the same grip position. Kinova3 needs it to reach its drop point: with
    # the hand pointing straight down its elbow is straight ~0.76 m out from its base,
    # short of the ~0.80 m the goal compartment needs.
    reach_tilt_rad: dict[str, float] = {"Kinova3": 0.45}

    def _can_index(self, env) -> int:
        return next(i for i, o in enumerate(env.robosuite_env.objects) if o.name == "Can")

    def object_body(self, env):
        return env.robosuite_env.obj_body_id["Can"]

    def grasp_offset_m(self, env):
        # Grip a little above the can's centre so the fingers clear the bin floor.
        return np.array([0.0, 0.0, 0.01])

    def travel_height(self, env):
        return float(env.robosuite_env.bin1_pos[2]) + self.wall_height_m + 0.02

    def grasp_candidates(self, env):
        # A can allows any yaw: every eighth of a turn, so that near a wall or a corner of
        # the bin one keeps the open fingers (up to ~7 cm either side) off the walls.
        return _quarter_turns(0.0) + _quarter_turns(np.pi / 4)

    def place_point(self, env):
        index = self._can_index(env)
        rs_env = env.robosuite_env
        centre = np.array(rs_env.target_bin_placements[index], dtype=np.float64)
        # Success wants the can's centre inside its compartment (a quarter of the bin,
        # centred on `centre`) and less than 10 cm above the bin floor. Aim for the
        # point of the compartment nearest the robot, a can's radius and a margin in
        # from its walls: the far compartments are at the edge of some arms' reach.
        half_xy = np.asarray(rs_env.bin_size[:2]) / 4.0 - 0.06
        base_xy = env.T_world_base()[:2, 3]
        place_xy = np.clip(base_xy, centre[:2] - half_xy, centre[:2] + half_xy)
        # Let go with the can's bottom just inside the compartment and the fingertips above
        # the dividers' tops, so opening fingers cannot catch on them; the can drops ~5 cm.
        return np.array([*place_xy, float(rs_env.bin2_pos[2]) + self.wall_height_m + 0.03])

    def place_rotation(self, env, R_grasp):
        # A can looks the same at any yaw: turn the hand with the arm as it swings from the
        # grasp to the goal, so the wrist does not have to turn the other way (a Panda's
        # wrist runs out of range doing that on some far grasps).
        base_xy = env.T_world_base()[:2, 3]
        from_base = self.object_pose(env)[0][:2] - base_xy
        outward = self.place_point(env)[:2] - base_xy
        R = _rot_z(_yaw_between(from_base, outward)) @ R_grasp
        tilt = self.reach_tilt_rad.get(env.robot_name, 0.0)
        if tilt == 0.0:
            return R
        outward = np.array([*outward / np.linalg.norm(outward), 0.0])
        axis = np.cross(outward, [0.0, 0.0, 1.0])  # turning about it swings the tips outward
        return _axis_angle_matrix(axis, tilt) @ R


class DoorDemonstrator(ScriptedDemonstrator):
    """Grasp the lever from the front, turn it down to free the latch, swing the door open.

    The grasp pose is held fixed relative to the latch body; the door's own kinematics
    (hinge and latch joints, evaluated on a scratch copy of the state) say where the
    latch, and so the hand, has to be for each (hinge, latch) angle pair.
    """

    task = "Door"
    # The latch's tip clears the frame once the lever is turned down past ~1.2 rad
    # (its range is ±1.57); aim beyond that and pull only once it is there.
    latch_goal_rad = 1.45
    latch_free_rad = 1.25
    hinge_goal_rad = 0.4  # the hinge's limit; success is > 0.3

    def _setup(self, env: RobosuiteTraceEnv) -> None:
        rs_env = env.robosuite_env
        model = env.sim.model._model
        self.memory["scratch"] = mujoco.MjData(model)
        self.memory["latch_body"] = rs_env.object_body_ids["latch"]
        self.memory["hinge_qpos"] = rs_env.hinge_qpos_addr
        self.memory["latch_qpos"] = rs_env.handle_qpos_addr
        # Which way "down" is for the lever depends on how the door was placed.
        self.memory["latch_sign"] = 1.0
        down = self._handle_at(env, 0.0, 0.3)[2] < self._handle_at(env, 0.0, 0.0)[2]
        self.memory["latch_sign"] = 1.0 if down else -1.0

    def _T_world_latch_at(self, env: RobosuiteTraceEnv, hinge: float, latch: float) -> np.ndarray:
        scratch, model = self.memory["scratch"], env.sim.model._model
        scratch.qpos[:] = env.sim.data.qpos
        scratch.qpos[self.memory["hinge_qpos"]] = hinge
        scratch.qpos[self.memory["latch_qpos"]] = latch * self.memory["latch_sign"]
        mujoco.mj_kinematics(model, scratch)
        body = self.memory["latch_body"]
        T = np.eye(4)
        T[:3, :3] = scratch.xmat[body].reshape(3, 3)
        T[:3, 3] = scratch.xpos[body]
        return T

    def _handle_at(self, env: RobosuiteTraceEnv, hinge: float, latch: float) -> np.ndarray:
        T_world_latch = self._T_world_latch_at(env, hinge, latch)
        T_world_latch_now = self._T_world_latch_at(
            env,
            env.sim.data.qpos[self.memory["hinge_qpos"]],
            env.sim.data.qpos[self.memory["latch_qpos"]] * self.memory["latch_sign"],
        )
        handle_now = env.ground_truth_points()["handle"]
        handle_latch = np.linalg.solve(T_world_latch_now, np.append(handle_now, 1.0))
        return (T_world_latch @ handle_latch)[:3]

    def _door_normal(self, env: RobosuiteTraceEnv) -> np.ndarray:
        """Unit world vector out of the door's face, toward the lever (horizontal)."""
        normal = self._T_world_latch_at(env, 0.0, 0.0)[:3, 1]
        points = env.ground_truth_points()
        if np.dot(points["handle"] - points["door"], normal) < 0:
            normal = -normal
        return normal

    def _grasp_candidates(self, env: RobosuiteTraceEnv) -> list[tuple[np.ndarray, np.ndarray]]:
        """(R_grasp, approach_world) pairs that all hold the lever: the hand reaching it from
        the front, level or a little from above or either side, fingers closing across the
        bar's height (a wide hand from above would hit the door behind the lever)."""
        approach_eef = np.array([0.0, 0.0, 1.0])  # the grip site's z points out of the hand
        closing_eef = self.closing_axis_eef(env)
        source = np.stack([closing_eef, approach_eef, np.cross(closing_eef, approach_eef)], 1)
        into_door = -self.memory["normal"]
        candidates = []
        for yaw in (0.0, -0.3, 0.3):
            for pitch in (0.0, 0.3):
                approach = np.cos(pitch) * (_rot_z(yaw) @ into_door)
                approach[2] -= np.sin(pitch)
                approach /= np.linalg.norm(approach)
                for up_sign in (1.0, -1.0):
                    up = up_sign * (np.array([0.0, 0.0, 1.0]) - approach * approach[2])
                    up /= np.linalg.norm(up)
                    target = np.stack([up, approach, np.cross(up, approach)], 1)
                    candidates.append((target @ source.T, approach))
        return candidates

    def _plan_score(
        self, env: RobosuiteTraceEnv, ik: ArmKinematics, R: np.ndarray, approach: np.ndarray
    ) -> tuple[float, ...]:
        """How well the arm can follow one grasp through the whole task (lower is better).

        Inverse kinematics along the plan, each pose from the last as the controller would
        go: in front of the lever, at it, the lever turned, the door swung open."""
        handle = self.memory["handle_rest"]
        latch_addr, hinge_addr = self.memory["latch_qpos"], self.memory["hinge_qpos"]
        sign = self.memory["latch_sign"]
        T_grasp = np.eye(4)
        T_grasp[:3, :3], T_grasp[:3, 3] = R, handle
        T_latch_eef = np.linalg.solve(self._T_world_latch_at(env, 0.0, 0.0), T_grasp)
        closed = {latch_addr: 0.0, hinge_addr: 0.0}
        waypoints = [(handle - 0.10 * approach, R, closed), (handle, R, closed)]
        for latch in (0.5, 1.0, self.latch_goal_rad):
            T = self._T_world_latch_at(env, 0.0, latch) @ T_latch_eef
            waypoints.append((T[:3, 3], T[:3, :3], {latch_addr: latch * sign, hinge_addr: 0.0}))
        for hinge in (0.15, 0.3, self.hinge_goal_rad):
            T = self._T_world_latch_at(env, hinge, self.latch_goal_rad) @ T_latch_eef
            turned = {latch_addr: self.latch_goal_rad * sign, hinge_addr: hinge}
            waypoints.append((T[:3, 3], T[:3, :3], turned))
        holdable = np.zeros(ik.model.nbody, bool)
        holdable[self.memory["latch_body"]] = True
        q = env.sim.data.qpos[ik.qpos_idx].copy()
        pos_err = rot_err = 0.0
        margin = slack = np.inf
        for pos, R_waypoint, joints in waypoints:
            ik.set_qpos(joints)
            q, p_err, r_err = ik.solve(pos, R_waypoint, q)
            pos_err, rot_err = max(pos_err, p_err), max(rot_err, r_err)
            margin = min(margin, ik.limit_margin(q))
            slack = min(slack, ik.slack(q, holdable))
        # A joint at its limit stalls the controller even where the others could make up
        # for it, so a plan needs some room at every joint.
        feasible = pos_err < 0.005 and rot_err < 0.05 and slack >= 0 and margin > 0.1
        return (float(not feasible), -min(slack, 0.0), -margin, pos_err + 0.1 * rot_err)

    def _choose_grasp(self, env: RobosuiteTraceEnv) -> None:
        ik = ArmKinematics(env)
        candidates = self._grasp_candidates(env)
        scores = [self._plan_score(env, ik, R, approach) for R, approach in candidates]
        best = min(range(len(candidates)), key=scores.__getitem__)
        self.memory["R_grasp"], self.memory["approach"] = candidates[best]
        self.memory["plan_score"] = scores[best]

    def _act(self, env: RobosuiteTraceEnv) -> np.ndarray:
        if self.phase == "start":
            self._setup(env)
            # Aim at where the lever rests; chasing it would follow it down if touched.
            self.memory["handle_rest"] = env.ground_truth_points()["handle"]
            self.memory["normal"] = self._door_normal(env)
            self.memory["hold"] = env.T_world_eef()
            self._goto("open")
        if self.phase == "open":
            # Open the hand where it is first: the grasp is planned with the fingers open.
            hold = self.memory["hold"]
            action, _ = self.servo(env, hold[:3, 3], hold[:3, :3], OPEN)
            if self.gripper_settled(env, min_steps=4) or self.phase_steps > 12:
                self._choose_grasp(env)
                self._goto("hover")
            return action
        R = self.memory["R_grasp"]
        handle = self.memory["handle_rest"]
        qpos = env.sim.data.qpos
        hinge = float(qpos[self.memory["hinge_qpos"]])
        latch = float(qpos[self.memory["latch_qpos"]]) * self.memory["latch_sign"]

        if self.phase == "hover":
            # In front of the lever first, turning the hand on the way.
            action, err = self.servo(env, handle - 0.10 * self.memory["approach"], R, OPEN)
            # Turned fully before reaching in: a hand still turning knocks the lever down.
            if (err < 0.01 and self.last_rot_err_rad < 0.05) or self.phase_steps > 100:
                self._goto("descend")
            return action
        if self.phase == "descend":
            action, err = self.servo(env, handle, R, OPEN, max_step_m=0.01)
            if err < 0.005 or self.phase_steps > 60:
                self._goto("close")
            return action
        if self.phase == "close":
            action, _ = self.servo(env, handle, R, CLOSE)
            if self.gripper_settled(env):
                T_world_latch = self._T_world_latch_at(env, hinge, latch)
                self.memory["T_latch_eef"] = np.linalg.solve(T_world_latch, env.T_world_eef())
                self.memory["latch_cmd"], self.memory["hinge_cmd"] = latch, hinge
                self._goto("turn")
            return action

        # Ramp the commanded joint angles, and hold the grasp fixed on the latch body.
        if self.phase == "turn":
            self.memory["latch_cmd"] = min(self.memory["latch_cmd"] + 0.06, self.latch_goal_rad)
            if latch >= self.latch_free_rad or self.phase_steps > 80:
                self._goto("pull")
        elif self.phase == "pull":
            self.memory["hinge_cmd"] = min(self.memory["hinge_cmd"] + 0.015, self.hinge_goal_rad)
        T_world_target = (
            self._T_world_latch_at(env, self.memory["hinge_cmd"], self.memory["latch_cmd"])
            @ self.memory["T_latch_eef"]
        )
        action, _ = self.servo(env, T_world_target[:3, 3], T_world_target[:3, :3], CLOSE)
        return action


DEMONSTRATORS: dict[str, type[ScriptedDemonstrator]] = {
    "Lift": LiftDemonstrator,
    "Stack": StackDemonstrator,
    "PickPlaceCan": PickPlaceCanDemonstrator,
    "Door": DoorDemonstrator,
}


def make_demonstrator(task: str) -> ScriptedDemonstrator:
    """A fresh scripted demonstrator for one task; call it with the env to get an action."""
    if task not in DEMONSTRATORS:
        raise ValueError(f"no demonstrator for task {task!r}; have {sorted(DEMONSTRATORS)}")
    return DEMONSTRATORS[task]()


def run_episode(
    env: RobosuiteTraceEnv, seed: int, max_steps: int | None = None
) -> tuple[bool, int]:
    """Roll one seeded episode with the task's demonstrator; (succeeded, steps taken).

    Success means the task's success holds at the end of the episode (an object that
    was lifted and then dropped does not count), or from the moment of letting go for
    tasks that end with the hand backing off.
    """
    demo = make_demonstrator(env.task)
    _, info = env.reset(seed=seed)
    max_steps = max_steps or MAX_EPISODE_STEPS[env.task]
    success_streak = 0
    for step in range(max_steps):
        _, _, _, _, info = env.step(demo(env))
        success_streak = success_streak + 1 if info["success"] else 0
        # Stop once success has held for a second (20 steps).
        if success_streak >= 20:
            return True, step + 1
    return bool(info["success"]), max_steps


def measure(
    tasks: tuple[str, ...], robots: tuple[str, ...], episodes: int, first_seed: int = 0
) -> dict[tuple[str, str], float]:
    """Success rate of each task × robot over `episodes` seeds, printed as it goes."""
    rates: dict[tuple[str, str], float] = {}
    for task in tasks:
        for robot in robots:
            env = RobosuiteTraceEnv(task, robot, render_images=False)
            start = time.perf_counter()
            failed = []
            for seed in range(first_seed, first_seed + episodes):
                ok, _ = run_episode(env, seed)
                if not ok:
                    failed.append(seed)
            env.close()
            rates[(task, robot)] = 1.0 - len(failed) / episodes
            print(
                f"{task:>13} {robot:>8}: {episodes - len(failed):3d}/{episodes} "
                f"({time.perf_counter() - start:5.0f} s) failed seeds {failed[:10]}",
                flush=True,
            )
    return rates


def _print_table(rates: dict[tuple[str, str], float], tasks, robots, episodes: int) -> None:
    print(f"\nsuccess over {episodes} seeds")
    print(f"| task | {' | '.join(robots)} |")
    print(f"|---|{'---|' * len(robots)}")
    for task in tasks:
        row = " | ".join(f"{rates[(task, robot)]:.0%}" for robot in robots)
        print(f"| {task} | {row} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--robots", nargs="+", default=list(ROBOTS), choices=ROBOTS)
    args = parser.parse_args()
    tasks, robots = tuple(args.tasks), tuple(args.robots)
    rates = measure(tasks, robots, args.episodes, args.first_seed)
    _print_table(rates, tasks, robots, args.episodes)


if __name__ == "__main__":
    main()
