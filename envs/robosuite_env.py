"""`RobosuiteTraceEnv`: a robosuite 1.5 task as a gymnasium env with calibrated RGB-D.

This module is the one place where robosuite's conventions are converted to the
project's (DESIGN.md, "Frames and units"):

- images: robosuite renders OpenGL-flipped (row 0 at the bottom); flipped once here so
  row 0 is the top, as OpenCV expects;
- depth: robosuite returns the normalised OpenGL depth buffer; converted here with
  `get_real_depth_map` to metres along the optical axis (camera-frame z);
- camera pose: MuJoCo cameras look down their -z with y up; `T_world_cam` here is in
  the OpenCV camera convention (x right, y down, z forward), camera → world;
- intrinsics: (fx, fy, cx, cy) in pixels, with pixel centres at integer coordinates
  (OpenCV), so the principal point of a W×H image is ((W-1)/2, (H-1)/2).

Observation (a `gymnasium.spaces.Dict`), for the first camera in `camera_names`:

    rgb          uint8[H, W, 3]   row 0 at the top
    depth_m      float32[H, W]    camera-frame z in metres (far plane where nothing is hit)
    intrinsics   float32[4]       fx, fy, cx, cy in pixels
    T_world_cam  float32[4, 4]    camera (OpenCV) → world
    T_base_cam   float32[4, 4]    camera (OpenCV) → robot base
    proprio      float32[D]       see `proprio_layout()`:
                                  eef_pos_base[3], eef_quat_base_xyzw[4],
                                  gripper_qpos[G], joint_pos[J]
    instruction  str              the task's language instruction

Further cameras add the same five camera keys prefixed with the camera name and a
slash, e.g. `robot0_eye_in_hand/rgb`. The eef is robosuite's grip site (between the
fingertips); the base frame is the robot's root body.

Action: float32[7] in [-1, 1]: (dx, dy, dz, dax, day, daz, gripper), robosuite's
OSC_POSE delta in the robot base frame (1 ↔ 5 cm or 0.5 rad per step) and the
gripper command (-1 open, +1 close).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import gymnasium as gym
    import mujoco  # noqa: F401  (imported to fail early, with the hint, when missing)
    import robosuite
    import robosuite.utils.transform_utils as rs_transforms
    from gymnasium import spaces
    from robosuite import load_composite_controller_config
    from robosuite.utils.camera_utils import get_real_depth_map
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"envs.robosuite_env needs robosuite, mujoco and gymnasium: pip install 'mu0[sim]' ({e})"
    ) from e

from envs import INSTRUCTIONS, ROBOTS, TASKS

# MuJoCo camera axes (x right, y up, z backward) → OpenCV camera axes (x right, y down,
# z forward): a rotation of π about x, applied on the camera side.
_R_MJCAM_CVCAM = np.diag([1.0, -1.0, -1.0])

# agentview sees Lift and Stack up close; the bins and the door need frontview's width.
DEFAULT_CAMERAS: dict[str, str] = {
    "Lift": "agentview",
    "Stack": "agentview",
    "PickPlaceCan": "frontview",
    "Door": "frontview",
}

# robosuite 1.5.1's Robotiq 2F-85 (UR5e's and Kinova3's stock hand) jams on mujoco 3.9:
# each inner knuckle collides with its inner finger and the pads stall ~6 cm apart, so
# it cannot hold the 4 cm cubes. Those arms get the 2F-140 (IIWA's stock hand) instead.
DEFAULT_GRIPPERS: dict[str, str] = {"UR5e": "Robotiq140Gripper", "Kinova3": "Robotiq140Gripper"}

CAMERA_KEYS = ("rgb", "depth_m", "intrinsics", "T_world_cam", "T_base_cam")


@dataclass(frozen=True)
class CameraFrame:
    """One camera's calibrated RGB-D frame (see the module docstring for conventions)."""

    rgb: np.ndarray  # uint8[H, W, 3]
    depth_m: np.ndarray  # float32[H, W]
    intrinsics: np.ndarray  # float32[4]: fx, fy, cx, cy
    T_world_cam: np.ndarray  # float32[4, 4]
    T_base_cam: np.ndarray  # float32[4, 4]


def _pose(pos: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """A 4×4 homogeneous transform from a position[3] and a rotation[3, 3]."""
    T = np.eye(4)
    T[:3, :3] = rot
    T[:3, 3] = pos
    return T


def _inv_pose(T: np.ndarray) -> np.ndarray:
    R, t = T[:3, :3], T[:3, 3]
    return _pose(-R.T @ t, R.T)


class RobosuiteTraceEnv(gym.Env):
    """A robosuite manipulation task with one or more calibrated RGB-D cameras.

    Args:
        task: one of `envs.TASKS` ("Lift", "Stack", "PickPlaceCan", "Door").
        robot: one of `envs.ROBOTS` ("Panda", "UR5e", "Kinova3", "IIWA"); others that
            robosuite ships may work but are not tested.
        camera_names: cameras to render; the first fills the unprefixed keys. Default:
            `DEFAULT_CAMERAS[task]`, a fixed camera that sees the whole task.
        image_size: (height, width) of every camera image.
        render_images: if False, nothing is rendered and `rgb`/`depth_m` are zeros
            (camera parameters stay valid): identical physics at ~7x the speed, for
            state-only rollouts such as measuring the scripted demonstrators.
        control_freq: control rate in Hz.
        gripper: a robosuite gripper class name; default `DEFAULT_GRIPPERS` or the
            robot's own.
        terminate_on_success: end the episode (terminated=True) once the task succeeds.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        task: str = "Lift",
        robot: str = "Panda",
        camera_names: str | tuple[str, ...] | list[str] | None = None,
        image_size: tuple[int, int] = (128, 128),
        render_images: bool = True,
        control_freq: int = 20,
        gripper: str | None = None,
        terminate_on_success: bool = False,
        render_mode: str | None = None,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
        if robot not in ROBOTS:
            raise ValueError(f"robot {robot!r} is not one of the tested robots {ROBOTS}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.task = task
        self.robot_name = robot
        if camera_names is None:
            camera_names = DEFAULT_CAMERAS[task]
        self.camera_names: tuple[str, ...] = (
            (camera_names,) if isinstance(camera_names, str) else tuple(camera_names)
        )
        if not self.camera_names:
            raise ValueError("at least one camera name is needed (camera parameters are observed)")
        self.image_hw = (int(image_size[0]), int(image_size[1]))
        self.render_images = render_images
        self.terminate_on_success = terminate_on_success
        self.render_mode = render_mode
        self.instruction: str = INSTRUCTIONS[task]

        self._env = robosuite.make(
            task,
            robots=robot,
            gripper_types=gripper or DEFAULT_GRIPPERS.get(robot, "default"),
            controller_configs=_osc_pose_controller_config(),
            has_renderer=False,
            has_offscreen_renderer=render_images,
            use_camera_obs=render_images,
            use_object_obs=True,
            camera_names=list(self.camera_names),
            camera_heights=self.image_hw[0],
            camera_widths=self.image_hw[1],
            camera_depths=True,
            control_freq=control_freq,
            # A hard reset rebuilds the sim; once the old one is collected the renderer
            # returns dark frames and NaN depth. Soft resets keep one sim and context.
            hard_reset=False,
            # Episode length is gymnasium's TimeLimit's job (set at registration).
            ignore_done=True,
            reward_shaping=False,
        )
        self._robot = self._env.robots[0]
        self._arm = self._robot.arms[0]
        model = self._env.sim.model
        for name in self.camera_names:
            if model.camera_name2id(name) < 0:
                raise ValueError(f"camera {name!r} not in {model.camera_names}")
        self._base_body_id = model.body_name2id(self._robot.robot_model.root_body)
        self._eef_site_id = self._robot.eef_site_id[self._arm]
        self._joint_qpos_idx = np.asarray(self._robot._ref_joint_pos_indexes)
        self._gripper_qpos_idx = np.asarray(self._robot._ref_gripper_joint_pos_indexes[self._arm])

        H, W = self.image_hw
        D = self._proprio_dim()
        camera_space = {
            "rgb": spaces.Box(0, 255, (H, W, 3), np.uint8),
            "depth_m": spaces.Box(0.0, np.inf, (H, W), np.float32),
            "intrinsics": spaces.Box(0.0, np.inf, (4,), np.float32),
            "T_world_cam": spaces.Box(-np.inf, np.inf, (4, 4), np.float32),
            "T_base_cam": spaces.Box(-np.inf, np.inf, (4, 4), np.float32),
        }
        obs_spaces: dict[str, spaces.Space] = dict(camera_space)
        for name in self.camera_names[1:]:
            obs_spaces.update({f"{name}/{k}": v for k, v in camera_space.items()})
        obs_spaces["proprio"] = spaces.Box(-np.inf, np.inf, (D,), np.float32)
        obs_spaces["instruction"] = spaces.Text(max_length=256, charset=string.printable)
        self.observation_space = spaces.Dict(obs_spaces)
        low, high = self._env.action_spec
        self.action_space = spaces.Box(low.astype(np.float32), high.astype(np.float32))
        self._last_frames: dict[str, CameraFrame] = {}

    # ------------------------------------------------------------------ gymnasium API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=seed)
        # robosuite draws object placements and joint noise from numpy's global RNG; seed
        # it from our generator for this one reset and put the caller's state back.
        episode_seed = int(self.np_random.integers(2**32 - 1))
        saved_state = np.random.get_state()  # noqa: NPY002 (robosuite uses the legacy RNG)
        np.random.seed(episode_seed)  # noqa: NPY002
        try:
            self._env.rng = np.random.default_rng(episode_seed)
            rs_obs = self._env.reset()
        finally:
            np.random.set_state(saved_state)  # noqa: NPY002
        obs = self._observation(rs_obs)
        return obs, self._info()

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        if action.shape != self.action_space.shape:
            raise ValueError(
                f"action must have shape {self.action_space.shape}, got {action.shape}"
            )
        rs_obs, reward, _, _ = self._env.step(action)
        info = self._info()
        terminated = bool(self.terminate_on_success and info["success"])
        return self._observation(rs_obs), float(reward), terminated, False, info

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        frame = self._last_frames.get(self.camera_names[0])
        return None if frame is None else frame.rgb.copy()

    def close(self) -> None:
        self._env.close()

    # ------------------------------------------------------------------ ground truth

    @property
    def sim(self) -> Any:
        """robosuite's MjSim (model, data, render); for ground truth and tests."""
        return self._env.sim

    @property
    def robosuite_env(self) -> Any:
        """The wrapped robosuite environment."""
        return self._env

    def success(self) -> bool:
        return bool(self._env._check_success())

    def T_world_base(self) -> np.ndarray:
        """float64[4, 4]: robot base → world."""
        data = self._env.sim.data
        return _pose(
            data.body_xpos[self._base_body_id], data.body_xmat[self._base_body_id].reshape(3, 3)
        )

    def T_world_eef(self) -> np.ndarray:
        """float64[4, 4]: grip site → world (robosuite's eef frame)."""
        data = self._env.sim.data
        return _pose(
            data.site_xpos[self._eef_site_id], data.site_xmat[self._eef_site_id].reshape(3, 3)
        )

    def ground_truth_points(self) -> dict[str, np.ndarray]:
        """World positions (float64[3], metres) of the named points of this task.

        Always "eef" (the grip site); then per task:
        Lift: "cube"; Stack: "cube_red" (to pick), "cube_green" (to stack on);
        PickPlaceCan: "can", "can_target" (centre of its bin compartment, bin floor);
        Door: "handle" (the lever's grasp point), "door" (the panel's centre).
        """
        env, data = self._env, self._env.sim.data
        points = {"eef": data.site_xpos[self._eef_site_id].copy()}
        if self.task == "Lift":
            points["cube"] = data.body_xpos[env.cube_body_id].copy()
        elif self.task == "Stack":
            points["cube_red"] = data.body_xpos[env.cubeA_body_id].copy()
            points["cube_green"] = data.body_xpos[env.cubeB_body_id].copy()
        elif self.task == "PickPlaceCan":
            (i, obj) = next((i, o) for i, o in enumerate(env.objects) if o.name == "Can")
            points["can"] = data.body_xpos[env.obj_body_id[obj.name]].copy()
            points["can_target"] = np.array(env.target_bin_placements[i], dtype=np.float64)
        elif self.task == "Door":
            points["handle"] = data.site_xpos[env.door_handle_site_id].copy()
            points["door"] = data.body_xpos[env.object_body_ids["door"]].copy()
        return points

    def proprio_layout(self) -> list[tuple[str, slice]]:
        """Names and slices of the `proprio` vector."""
        G, J = len(self._gripper_qpos_idx), len(self._joint_qpos_idx)
        sizes = [
            ("eef_pos_base", 3),
            ("eef_quat_base_xyzw", 4),
            ("gripper_qpos", G),
            ("joint_pos", J),
        ]
        layout, start = [], 0
        for name, size in sizes:
            layout.append((name, slice(start, start + size)))
            start += size
        return layout

    def camera_frame(self, camera_name: str | None = None) -> CameraFrame:
        """The latest calibrated frame of one camera (the first by default)."""
        return self._last_frames[camera_name or self.camera_names[0]]

    # ------------------------------------------------------------------ conversions

    def _proprio_dim(self) -> int:
        return self.proprio_layout()[-1][1].stop

    def _proprio(self) -> np.ndarray:
        qpos = self._env.sim.data.qpos
        T_base_eef = _inv_pose(self.T_world_base()) @ self.T_world_eef()
        quat_xyzw = rs_transforms.mat2quat(T_base_eef[:3, :3])
        return np.concatenate(
            [
                T_base_eef[:3, 3],
                quat_xyzw,
                qpos[self._gripper_qpos_idx],
                qpos[self._joint_qpos_idx],
            ]
        ).astype(np.float32)

    def _camera_params(self, camera_name: str) -> tuple[np.ndarray, np.ndarray]:
        """(intrinsics float64[4], T_world_cam float64[4, 4]) of one camera, OpenCV frames."""
        model, data = self._env.sim.model, self._env.sim.data
        cam_id = model.camera_name2id(camera_name)
        H, W = self.image_hw
        # MuJoCo's fovy spans the full image height; pixels are square.
        f = 0.5 * H / np.tan(np.deg2rad(model.cam_fovy[cam_id]) / 2.0)
        intrinsics = np.array([f, f, (W - 1) / 2.0, (H - 1) / 2.0])
        R_world_mjcam = data.cam_xmat[cam_id].reshape(3, 3)
        T_world_cam = _pose(data.cam_xpos[cam_id], R_world_mjcam @ _R_MJCAM_CVCAM)
        return intrinsics, T_world_cam

    def _camera_frame(self, camera_name: str, rs_obs: dict[str, Any]) -> CameraFrame:
        H, W = self.image_hw
        intrinsics, T_world_cam = self._camera_params(camera_name)
        T_base_cam = _inv_pose(self.T_world_base()) @ T_world_cam
        if self.render_images:
            # robosuite's images are OpenGL-flipped (row 0 at the bottom): flip once, here.
            rgb = np.ascontiguousarray(rs_obs[f"{camera_name}_image"][::-1])
            depth_01 = rs_obs[f"{camera_name}_depth"][::-1, :, 0]
            depth_m = get_real_depth_map(self._env.sim, depth_01).astype(np.float32)
            depth_m = np.ascontiguousarray(depth_m)
        else:
            rgb = np.zeros((H, W, 3), np.uint8)
            depth_m = np.zeros((H, W), np.float32)
        return CameraFrame(
            rgb=rgb.astype(np.uint8, copy=False),
            depth_m=depth_m,
            intrinsics=intrinsics.astype(np.float32),
            T_world_cam=T_world_cam.astype(np.float32),
            T_base_cam=T_base_cam.astype(np.float32),
        )

    def _observation(self, rs_obs: dict[str, Any]) -> dict[str, Any]:
        self._last_frames = {name: self._camera_frame(name, rs_obs) for name in self.camera_names}
        obs: dict[str, Any] = {}
        for i, name in enumerate(self.camera_names):
            prefix = "" if i == 0 else f"{name}/"
            frame = self._last_frames[name]
            for key in CAMERA_KEYS:
                obs[prefix + key] = getattr(frame, key)
        obs["proprio"] = self._proprio()
        obs["instruction"] = self.instruction
        return obs

    def _info(self) -> dict[str, Any]:
        return {
            "success": self.success(),
            "instruction": self.instruction,
            "points_world": self.ground_truth_points(),
        }


def _osc_pose_controller_config() -> dict[str, Any]:
    """robosuite 1.5's BASIC composite controller with OSC_POSE on the (single) arm.

    Body parts these fixed-base single-arm robots lack are dropped, so robosuite does not
    warn about each of them on every make.
    """
    config = load_composite_controller_config(controller="BASIC")
    arm = config["body_parts"]["right"]
    if arm["type"] != "OSC_POSE":
        raise RuntimeError(f"expected OSC_POSE in robosuite's BASIC config, got {arm['type']}")
    config["body_parts"] = {"right": arm}
    return config
