"""A simulated ChArUco rig: the robosuite robot and cameras with a board on the gripper
(eye-to-hand) and one on the table (eye-in-hand), rendered with MuJoCo.

The scene is the robosuite task's own model (`RobosuiteTraceEnv`), with two textured
boards added to its MJCF before compiling; the arm is posed directly (joint positions,
through a small damped least-squares IK for end-effector targets) since calibration needs
exact poses, not dynamics. Ground truth comes from the unmodified environment's
observation: ``T_base_cam`` of each camera and, for the wrist camera,
``T_eef_cam = T_base_eef⁻¹ @ T_base_cam`` at any pose.

Conventions as in `envs.robosuite_env`: images row 0 at the top, OpenCV camera frames,
intrinsics (fx, fy, cx, cy) with pixel centres at integers, the end effector is
robosuite's grip site and the base its root body.
"""

from __future__ import annotations

import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    import mujoco
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError(f"envs.charuco_sim needs mujoco: pip install 'mu0[sim]' ({e})") from e

from calibration.board import CharucoBoardSpec, import_cv2
from calibration.transforms import (
    inv_T,
    make_T,
    matrix_to_quat_xyzw,
    matrix_to_rotvec,
    rotvec_to_matrix,
)

# MuJoCo camera axes (x right, y up, z backward) -> OpenCV (x right, y down, z forward).
_R_MJCAM_CVCAM = np.diag([1.0, -1.0, -1.0])

# Where the boards sit. On the gripper: in the grip-site frame (z along the approach
# direction, y the fingers' closing axis), a plate held in front of the fingers, its
# printed face (board -z) along the site's +y: towards the front camera when the gripper
# points down. On the table: printed face up, in front of the robot.
GRIPPER_BOARD_OFFSET_M = (0.0, 0.035, 0.03)  # board centre in the grip-site frame
TABLE_BOARD_CENTRE_BASE_M = (0.5, -0.2)  # x, y in the base frame, clear of the task's objects
# Geom groups of the two boards, so each kind of calibration renders only its own board.
GRIPPER_BOARD_GROUP, TABLE_BOARD_GROUP = 3, 4


@dataclass(frozen=True)
class SimTruth:
    """What the simulator knows exactly. float64[4, 4] each."""

    T_base_cam: np.ndarray  # the fixed camera
    T_eef_cam: np.ndarray  # the wrist camera
    T_eef_board: np.ndarray  # the board on the gripper
    T_base_table_board: np.ndarray  # the board on the table


class CharucoSimScene:
    """The robosuite ``task`` × ``robot`` scene with ChArUco boards, posed and rendered.

    Args:
        robot: a robosuite robot of `envs.ROBOTS`.
        camera: the fixed camera for eye-to-hand views (default: the task's default).
        wrist_camera: the camera on the wrist for eye-in-hand views.
        image_size: (height, width) of renders.
        board: the board printed on both plates.
    """

    def __init__(
        self,
        robot: str = "Panda",
        task: str = "Lift",
        camera: str | None = None,
        wrist_camera: str = "robot0_eye_in_hand",
        image_size: tuple[int, int] = (480, 640),
        board: CharucoBoardSpec | None = None,
        seed: int = 0,
    ) -> None:
        from envs.robosuite_env import DEFAULT_CAMERAS, RobosuiteTraceEnv

        self.board = board or CharucoBoardSpec()
        self.camera = camera or DEFAULT_CAMERAS[task]
        self.wrist_camera = wrist_camera
        self.image_hw = (int(image_size[0]), int(image_size[1]))
        # The unmodified environment: its model to extend, its observation as the truth.
        env = RobosuiteTraceEnv(
            task,
            robot,
            camera_names=(self.camera, wrist_camera),
            image_size=self.image_hw,
            render_images=False,
        )
        try:
            obs, _ = env.reset(seed=seed)
            self._env_T_base_cam = obs["T_base_cam"].astype(np.float64)
            self._env_intrinsics = obs["intrinsics"].astype(np.float64)
            wrist_T_base_cam = obs[f"{wrist_camera}/T_base_cam"].astype(np.float64)
            pos, quat = obs["proprio"][:3], obs["proprio"][3:7]
            from calibration.transforms import quat_xyzw_to_matrix

            T_base_eef0 = make_T(quat_xyzw_to_matrix(quat), pos)
            T_eef_cam = inv_T(T_base_eef0) @ wrist_T_base_cam
            rs_env = env.robosuite_env
            xml = rs_env.sim.model.get_xml()
            sim_model = rs_env.sim.model
            eef_site = sim_model.site_id2name(env._eef_site_id)
            base_body = sim_model.body_id2name(env._base_body_id)
            joint_names = [sim_model.joint_id2name(i) for i in env._robot._ref_joint_indexes]
            self.home_qpos = np.asarray(rs_env.sim.data.qpos, dtype=np.float64).copy()
            table_top_z = float(rs_env.sim.data.site_xpos[sim_model.site_name2id("table_top")][2])
            T_world_base = env.T_world_base()
        finally:
            env.close()

        self._tmp = tempfile.TemporaryDirectory(prefix="mu0-charuco-")
        texture = Path(self._tmp.name) / "charuco.png"
        cv2 = import_cv2()
        # A white margin of one square round the board, as printed boards have.
        px = 100
        cv2.imwrite(str(texture), self.board.image(px_per_square=px, margin_px=px))
        T_base_table_board = self._table_board_pose(T_world_base, table_top_z)
        self.model = mujoco.MjModel.from_xml_string(
            _add_boards(xml, texture, self.board, eef_site, T_world_base, T_base_table_board)
        )
        self.data = mujoco.MjData(self.model)
        self.data.qpos[:] = self.home_qpos
        mujoco.mj_forward(self.model, self.data)
        self._site_id = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_SITE, eef_site)
        self._base_id = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, base_body)
        self._joint_qpos = np.array(
            [
                self.model.jnt_qposadr[mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_JOINT, j)]
                for j in joint_names
            ]
        )
        self._joint_dof = np.array(
            [
                self.model.jnt_dofadr[mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_JOINT, j)]
                for j in joint_names
            ]
        )
        self._joint_range = np.array(
            [
                self.model.jnt_range[mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_JOINT, j)]
                for j in joint_names
            ]
        )
        self._renderer = mujoco.Renderer(self.model, *self.image_hw)
        self._scene_option = mujoco.MjvOption()
        self._scene_option.sitegroup[:] = 0  # grip-site markers would cover the board
        self._scene_option.geomgroup[0] = 0  # collision geoms (robosuite draws group 1)
        board_id = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, "mu0_gripper_board")
        T_world_board = _body_T(self.data, board_id)
        self.truth = SimTruth(
            T_base_cam=self._env_T_base_cam,
            T_eef_cam=T_eef_cam,
            T_eef_board=inv_T(self.T_base_eef()) @ inv_T(T_world_base) @ T_world_board,
            T_base_table_board=T_base_table_board,
        )

    # ------------------------------------------------------------------ state

    @property
    def num_joints(self) -> int:
        return len(self._joint_qpos)

    def joint_positions(self) -> np.ndarray:
        return self.data.qpos[self._joint_qpos].copy()

    def set_joint_positions(self, q: np.ndarray) -> None:
        q = np.clip(
            np.asarray(q, dtype=np.float64), self._joint_range[:, 0], self._joint_range[:, 1]
        )
        self.data.qpos[self._joint_qpos] = q
        mujoco.mj_forward(self.model, self.data)

    def T_world_base(self) -> np.ndarray:
        return _body_T(self.data, self._base_id)

    def T_base_eef(self) -> np.ndarray:
        """float64[4, 4]: the grip site in the robot base frame (what the robot reports)."""
        T_world_eef = make_T(
            self.data.site_xmat[self._site_id].reshape(3, 3), self.data.site_xpos[self._site_id]
        )
        return inv_T(self.T_world_base()) @ T_world_eef

    def camera_params(self, camera: str) -> tuple[np.ndarray, np.ndarray]:
        """(K float64[3, 3], T_base_cam float64[4, 4]) of a camera in this scene."""
        cam_id = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if cam_id < 0:
            raise ValueError(f"no camera {camera!r}")
        H, W = self.image_hw
        f = 0.5 * H / np.tan(np.deg2rad(self.model.cam_fovy[cam_id]) / 2.0)
        K = np.array([[f, 0.0, (W - 1) / 2.0], [0.0, f, (H - 1) / 2.0], [0.0, 0.0, 1.0]])
        T_world_cam = make_T(
            self.data.cam_xmat[cam_id].reshape(3, 3) @ _R_MJCAM_CVCAM, self.data.cam_xpos[cam_id]
        )
        return K, inv_T(self.T_world_base()) @ T_world_cam

    def render(self, camera: str, board: str = "gripper") -> np.ndarray:
        """uint8[H, W, 3], row 0 at the top, showing one board: "gripper", "table" or "none"."""
        if board not in ("gripper", "table", "none"):
            raise ValueError(f"board must be gripper, table or none, got {board!r}")
        self._scene_option.geomgroup[GRIPPER_BOARD_GROUP] = board == "gripper"
        self._scene_option.geomgroup[TABLE_BOARD_GROUP] = board == "table"
        self._renderer.update_scene(self.data, camera=camera, scene_option=self._scene_option)
        return self._renderer.render().copy()

    # ------------------------------------------------------------------ posing

    def solve_ik(
        self, T_base_eef_target: np.ndarray, iterations: int = 200, tol: float = 1e-5
    ) -> tuple[np.ndarray, float]:
        """Joint positions that put the grip site at a target (damped least squares from the
        current joints); returns (q, remaining error: metres + radians). Leaves the scene
        at the solution."""
        T_world_target = self.T_world_base() @ T_base_eef_target
        jacp = np.zeros((3, self.model.nv))
        jacr = np.zeros((3, self.model.nv))
        err = np.inf
        for _ in range(iterations):
            pos = self.data.site_xpos[self._site_id]
            R = self.data.site_xmat[self._site_id].reshape(3, 3)
            e = np.concatenate(
                [T_world_target[:3, 3] - pos, matrix_to_rotvec(T_world_target[:3, :3] @ R.T)]
            )
            err = float(np.linalg.norm(e[:3]) + np.linalg.norm(e[3:]))
            if err < tol:
                break
            mujoco.mj_jacSite(self.model, self.data, jacp, jacr, self._site_id)
            J = np.vstack([jacp, jacr])[:, self._joint_dof]
            dq = J.T @ np.linalg.solve(J @ J.T + 1e-4 * np.eye(6), e)
            self.set_joint_positions(self.joint_positions() + np.clip(dq, -0.2, 0.2))
        return self.joint_positions(), err

    def move_to(self, T_base_eef_target: np.ndarray, tol_m: float = 1e-4) -> bool:
        """Pose the arm at a target; False (arm back where it was) if IK cannot reach it."""
        q0 = self.joint_positions()
        _, err = self.solve_ik(T_base_eef_target)
        if err > tol_m:
            self.set_joint_positions(q0)
            return False
        return True

    def calibration_targets(self, kind: str, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """``n`` varied end-effector targets that show the board to the camera.

        eye_to_hand: the gripper (and its board) moves through a box in front of the fixed
        camera, the board turned towards it and tilted up to ~30° about random axes.
        eye_in_hand: the wrist camera looks down at the table board from 25–45 cm, tilted
        up to ~25° and turned about the vertical.
        """
        targets = []
        if kind == "eye_to_hand":
            T_base_cam = self.truth.T_base_cam
            T0 = self.T_base_eef()  # home: gripper down, board towards the front camera
            for _ in range(n):
                p = T0[:3, 3] + rng.uniform([0.0, -0.15, 0.0], [0.25, 0.15, 0.2])
                tilt = rotvec_to_matrix(_random_axis(rng) * np.deg2rad(rng.uniform(10, 30)))
                R = tilt @ T0[:3, :3]
                # Keep the printed face (board -z) turned towards the camera.
                face = R @ self.truth.T_eef_board[:3, :3] @ np.array([0.0, 0.0, -1.0])
                to_cam = T_base_cam[:3, 3] - p
                if face @ to_cam / np.linalg.norm(to_cam) < np.cos(np.deg2rad(60)):
                    continue
                targets.append(make_T(R, p))
        elif kind == "eye_in_hand":
            T_board = self.truth.T_base_table_board
            centre = (
                T_board[:3, :3] @ np.array([*(np.array(self.board.size_m) / 2), 0.0])
                + T_board[:3, 3]
            )
            down = np.diag([1.0, -1.0, -1.0])  # gripper z down, x along base x
            for _ in range(n):
                yaw = rotvec_to_matrix([0.0, 0.0, rng.uniform(-0.8, 0.8)])
                tilt = rotvec_to_matrix(_random_axis(rng) * np.deg2rad(rng.uniform(5, 25)))
                R = tilt @ yaw @ down
                height = rng.uniform(0.25, 0.45)
                # Point the wrist camera's optical axis at the board centre.
                cam_axis = R @ self.truth.T_eef_cam[:3, 2]
                cam_pos_eef = self.truth.T_eef_cam[:3, 3]
                cam_point = centre + rng.uniform(-0.03, 0.03, 3) * [1, 1, 0]
                cam_origin = cam_point - cam_axis * height / max(-cam_axis[2], 0.3)
                p = cam_origin - R @ cam_pos_eef
                targets.append(make_T(R, p))
        else:
            raise ValueError(f"kind must be eye_to_hand or eye_in_hand, got {kind!r}")
        while len(targets) < n:  # the eye-to-hand filter dropped some: draw more
            targets += self.calibration_targets(kind, n - len(targets), rng)
        return targets[:n]

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if getattr(self, "_renderer", None) is not None:
            self._renderer.close()
            self._renderer = None
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> CharucoSimScene:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _table_board_pose(self, T_world_base: np.ndarray, table_top_z: float) -> np.ndarray:
        """Board frame in the base: printed face up (board z down), centred at
        TABLE_BOARD_CENTRE_BASE_M, resting on the table top."""
        w, h = self.board.size_m
        R = np.diag([1.0, -1.0, -1.0])  # board x along base x, y along -y, z down
        z_base = table_top_z - T_world_base[2, 3] + 0.0005
        cx, cy = TABLE_BOARD_CENTRE_BASE_M
        origin = np.array([cx, cy, z_base]) - R @ np.array([w / 2, h / 2, 0.0])
        return make_T(R, origin)


def _random_axis(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _body_T(data: Any, body_id: int) -> np.ndarray:
    return make_T(data.xmat[body_id].reshape(3, 3), data.xpos[body_id])


def _mj_quat(R: np.ndarray) -> str:
    x, y, z, w = matrix_to_quat_xyzw(R)
    return f"{w:.12g} {x:.12g} {y:.12g} {z:.12g}"


def _board_geom_xml(
    name: str, spec: CharucoBoardSpec, group: int
) -> tuple[list[ET.Element], ET.Element]:
    """Asset elements (texture, material, mesh) and a geom for one board plate.

    The mesh is a flat quad in the board frame covering the printed image including its
    one-square margin; texture coordinates pin the image's corners to the quad's, so the
    texture's squares land exactly at `spec.corners_board()`.
    """
    s = spec.square_m
    w, h = spec.size_m
    x0, y0, x1, y1 = -s, -s, w + s, h + s  # image extent with the margin
    # Two triangles wound so their normal is -z: the printed face, lit from the front.
    vertex = f"{x0} {y0} 0 {x1} {y0} 0 {x1} {y1} 0 {x0} {y1} 0"
    # MuJoCo stores the PNG's row 0 first, at texture v = 0.
    texcoord = "0 0 1 0 1 1 0 1"
    face = "0 2 1 0 3 2"
    assets = [
        ET.Element("texture", name=f"{name}_tex", type="2d", file="__TEXTURE__"),
        ET.Element(
            "material",
            name=f"{name}_mat",
            texture=f"{name}_tex",
            specular="0",
            shininess="0",
            reflectance="0",
            # Self-lit, so the print keeps its contrast whatever the scene's lights do.
            emission="1",
        ),
        ET.Element(
            "mesh",
            name=f"{name}_mesh",
            vertex=vertex,
            texcoord=texcoord,
            face=face,
            inertia="shell",
        ),
    ]
    geom = ET.Element(
        "geom",
        name=f"{name}_geom",
        type="mesh",
        mesh=f"{name}_mesh",
        material=f"{name}_mat",
        contype="0",
        conaffinity="0",
        group=str(group),
        mass="0",
    )
    return assets, geom


def _add_boards(
    xml: str,
    texture: Path,
    spec: CharucoBoardSpec,
    eef_site: str,
    T_world_base: np.ndarray,
    T_base_table_board: np.ndarray,
) -> str:
    """The robosuite MJCF with a board plate under the grip site and one on the table."""
    root = ET.fromstring(xml)
    asset = root.find("asset")
    worldbody = root.find("worldbody")
    # The body that carries the grip site, and the site's pose within it.
    parent, site = None, None
    for body in root.iter("body"):
        for s in body.findall("site"):
            if s.get("name") == eef_site:
                parent, site = body, s
    if parent is None:
        raise ValueError(f"grip site {eef_site!r} not found in the model")
    T_body_site = make_T(
        _quat_wxyz_to_matrix(site.get("quat", "1 0 0 0")),
        np.array([float(x) for x in site.get("pos", "0 0 0").split()]),
    )
    w, h = spec.size_m
    # Board frame in the site frame: printed face (board -z) along site +y, board x along
    # site x, board y along site z (down the approach axis), centred at the offset.
    R_site_board = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    centre = np.array(GRIPPER_BOARD_OFFSET_M) + R_site_board @ np.array([0.0, 0.0, 0.0])
    origin = centre - R_site_board @ np.array([w / 2, h / 2, 0.0])
    T_body_board = T_body_site @ make_T(R_site_board, origin)
    for name, holder, T, group in (
        ("mu0_gripper_board", parent, T_body_board, GRIPPER_BOARD_GROUP),
        ("mu0_table_board", worldbody, T_world_base @ T_base_table_board, TABLE_BOARD_GROUP),
    ):
        assets, geom = _board_geom_xml(name, spec, group)
        for a in assets:
            if a.get("file") == "__TEXTURE__":
                a.set("file", str(texture))
            asset.append(a)
        body = ET.SubElement(
            holder,
            "body",
            name=name,
            pos=" ".join(f"{x:.12g}" for x in T[:3, 3]),
            quat=_mj_quat(T[:3, :3]),
        )
        ET.SubElement(body, "inertial", pos="0 0 0", mass="0.001", diaginertia="1e-6 1e-6 1e-6")
        body.append(geom)
    return ET.tostring(root, encoding="unicode")


def _quat_wxyz_to_matrix(text: str) -> np.ndarray:
    from calibration.transforms import quat_xyzw_to_matrix

    w, x, y, z = (float(v) for v in text.split())
    return quat_xyzw_to_matrix(np.array([x, y, z, w]))


def simulate_calibration(
    scene: CharucoSimScene,
    kind: str = "eye_to_hand",
    num_poses: int = 20,
    seed: int = 0,
    pose_noise_mm: float = 0.0,
    pose_noise_deg: float = 0.0,
    bad: dict[int, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """Capture ``num_poses`` views in the scene, calibrate, and compare with the truth.

    The robot poses handed to the solver are the simulator's grip-site poses in the base
    frame, optionally with Gaussian noise (per axis) to stand in for a real arm's
    kinematic error; ``bad`` makes views' poses wrong on purpose: view index -> (metres,
    degrees) off, in random directions (a pose read while the arm still moved). Returns
    the figures (errors in mm and degrees) and the result; a refused calibration raises
    `CalibrationError`.
    """
    from calibration.board import detect_board
    from calibration.handeye import calibrate_hand_eye
    from calibration.transforms import pose_error

    rng = np.random.default_rng(seed)
    camera = scene.camera if kind == "eye_to_hand" else scene.wrist_camera
    board = "gripper" if kind == "eye_to_hand" else "table"
    K, _ = scene.camera_params(camera)
    home = scene.joint_positions()
    poses, views, unreachable = [], [], 0
    for target in scene.calibration_targets(kind, num_poses, rng):
        scene.set_joint_positions(home)  # every IK from the same start: no drift
        if not scene.move_to(target):
            unreachable += 1
            continue
        T_base_eef = scene.T_base_eef()
        if pose_noise_mm > 0 or pose_noise_deg > 0:
            dR = rotvec_to_matrix(rng.normal(size=3) * np.deg2rad(pose_noise_deg))
            T_base_eef = make_T(
                dR @ T_base_eef[:3, :3],
                T_base_eef[:3, 3] + rng.normal(size=3) * pose_noise_mm / 1e3,
            )
        poses.append(T_base_eef)
        views.append(detect_board(scene.render(camera, board), scene.board, K))
    scene.set_joint_positions(home)
    for i, (trans_m, rot_deg) in (bad or {}).items():
        u, w = rng.normal(size=3), rng.normal(size=3)
        poses[i] = poses[i] @ make_T(
            rotvec_to_matrix(w / np.linalg.norm(w) * np.deg2rad(rot_deg)),
            u / np.linalg.norm(u) * trans_m,
        )
    result = calibrate_hand_eye(kind, poses, views, scene.board, K)
    truth = scene.truth.T_base_cam if kind == "eye_to_hand" else scene.truth.T_eef_cam
    trans_err_mm, rot_err_deg = pose_error(result.T_ref_cam, truth)
    return {
        "kind": kind,
        "camera": camera,
        "poses_requested": num_poses,
        "poses_unreachable": unreachable,
        "views_captured": len(views),
        "trans_err_mm": round(trans_err_mm, 4),
        "rot_err_deg": round(rot_err_deg, 5),
        **result.quality(),
        "per_method_reprojection_rms_px": {
            k: round(v["reprojection_rms_px"], 4) if "reprojection_rms_px" in v else v.get("error")
            for k, v in result.per_method.items()
        },
        "result": result,
    }
