"""Contract test over every registered environment (after dm_control's env tests).

Spaces match, values are finite, seeded runs repeat, resets vary, images are not dark,
depth is finite, and a known body projected with the observed camera parameters lands
on its own pixels (found independently, with MuJoCo's segmentation render).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import envs

IMAGE_HW = (128, 128)
N_STEPS = 3

# The body whose projection is checked, per task, and the geoms that draw it.
PROJECTED_BODY = {
    "Lift": "cube_main",
    "Stack": "cubeA_main",
    "PickPlaceCan": "Can_main",
    "Door": "Door_door",
}
# For the door: its panel (a box).
PROJECTED_GEOM = {"Door": "Door_panel_visual"}


def test_import_envs_needs_no_simulator():
    code = (
        "import sys, envs; ids = envs.registered_ids();"
        "assert 'robosuite' not in sys.modules and 'mujoco' not in sys.modules, sys.modules.keys();"
        "print(len(ids))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(len(envs.TASKS) * len(envs.ROBOTS))


def test_missing_sim_extra_names_it():
    # Hide robosuite as if the extra were not installed.
    code = (
        "import sys; sys.modules['robosuite'] = None\n"
        "try:\n    import envs.robosuite_env\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'mu0[sim]'" in out.stdout


def test_registered_ids():
    ids = envs.registered_ids()
    assert "mu0/Lift-Panda-v0" in ids and "mu0/Door-IIWA-v0" in ids
    assert len(ids) == len(set(ids)) == 16


def _segmentation_geom_ids(env, camera_name: str) -> np.ndarray:
    """int[H, W]: the geom id seen at each pixel (-1 for none), rows top-down."""
    H, W = env.image_hw
    seg = env.sim.render(camera_name=camera_name, height=H, width=W, segmentation=True)
    seg = seg[::-1]  # robosuite renders OpenGL-flipped, like the RGB it returns
    import mujoco

    return np.where(seg[..., 0] == mujoco.mjtObj.mjOBJ_GEOM, seg[..., 1], -1)


def _project(T_world_cam: np.ndarray, intrinsics: np.ndarray, p_world: np.ndarray):
    """(u, v) pixel and camera-frame depth of a world point, OpenCV conventions."""
    fx, fy, cx, cy = intrinsics
    p_cam = np.linalg.inv(T_world_cam) @ np.append(p_world, 1.0)
    x, y, z = p_cam[:3]
    return np.array([fx * x / z + cx, fy * y / z + cy]), z


@pytest.fixture(scope="module")
def gym():
    gymnasium = pytest.importorskip("gymnasium")
    pytest.importorskip("robosuite")
    envs.register_all()
    return gymnasium


@pytest.mark.sim
@pytest.mark.parametrize("env_id", envs.registered_ids())
def test_env_contract(gym, env_id):
    env = gym.make(env_id, image_size=IMAGE_HW)
    try:
        _check_contract(env)
    finally:
        env.close()


def _rollout(env, seed: int):
    obs, info = env.reset(seed=seed)
    trajectory = [(obs, info)]
    rng = np.random.default_rng(seed)
    for _ in range(N_STEPS):
        action = rng.uniform(-0.5, 0.5, size=env.action_space.shape).astype(np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        assert np.isfinite(reward)
        assert isinstance(terminated, bool) and isinstance(truncated, bool)
        trajectory.append((obs, info))
    return trajectory


def _check_contract(env):
    inner = env.unwrapped
    space = env.observation_space
    H, W = IMAGE_HW

    run_a = _rollout(env, seed=7)
    for obs, info in run_a:
        # Spaces match, values finite, arrays not shared between steps.
        assert space.contains(obs), {k: getattr(v, "shape", v) for k, v in obs.items()}
        assert obs["rgb"].shape == (H, W, 3) and obs["rgb"].dtype == np.uint8
        for key in ("depth_m", "intrinsics", "T_world_cam", "T_base_cam", "proprio"):
            assert obs[key].dtype == np.float32 and np.all(np.isfinite(obs[key])), key
        assert obs["instruction"] == inner.instruction == envs.INSTRUCTIONS[inner.task]
        assert isinstance(info["success"], bool)
        assert "eef" in info["points_world"]
        # Not dark (the hard-reset trap), depth in metres and plausible.
        assert obs["rgb"].mean() > 40 and obs["rgb"].std() > 10
        assert obs["depth_m"].min() > 0.05 and obs["depth_m"].max() < 20.0
        # Rigid transforms, and T_base_cam consistent with T_world_cam.
        R = obs["T_world_cam"][:3, :3].astype(np.float64)
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-5)
        np.testing.assert_allclose(
            inner.T_world_base() @ obs["T_base_cam"], obs["T_world_cam"], atol=1e-4
        )
    assert not np.shares_memory(run_a[0][0]["rgb"], run_a[-1][0]["rgb"])

    # Seeded runs repeat.
    run_b = _rollout(env, seed=7)
    for (obs_a, info_a), (obs_b, info_b) in zip(run_a, run_b):
        np.testing.assert_allclose(obs_a["proprio"], obs_b["proprio"], atol=1e-6)
        for name, p in info_a["points_world"].items():
            np.testing.assert_allclose(p, info_b["points_world"][name], atol=1e-6)
        assert np.abs(obs_a["rgb"].astype(int) - obs_b["rgb"]).mean() < 0.5

    # Resets vary: another seed moves the task's objects.
    obs_c, info_c = env.reset(seed=8)
    moved = [
        np.linalg.norm(p - info_c["points_world"][name])
        for name, p in run_a[0][1]["points_world"].items()
        if name != "eef"
    ]
    assert max(moved) > 1e-3, moved

    _check_projection(inner, obs_c)


def _check_projection(inner, obs):
    """A known body, projected with the observed camera, lands on its own pixels."""
    sim = inner.sim
    body_id = sim.model.body_name2id(PROJECTED_BODY[inner.task])
    geom_name = PROJECTED_GEOM.get(inner.task)
    if geom_name is not None:
        geom_ids = [sim.model.geom_name2id(geom_name)]
    else:
        # The drawn geoms (robosuite's visual group), not the hidden collision ones.
        geom_ids = list(
            np.flatnonzero((sim.model.geom_bodyid == body_id) & (sim.model.geom_group == 1))
        )
    # The geoms' centre: for a box or a cylinder the centre of its silhouette.
    centre_world = np.mean([sim.data.geom_xpos[g] for g in geom_ids], axis=0)

    geom_at_pixel = _segmentation_geom_ids(inner, inner.camera_names[0])
    mask = np.isin(geom_at_pixel, geom_ids)
    assert mask.sum() >= 8, f"{PROJECTED_BODY[inner.task]} covers {mask.sum()} pixels"
    v_px, u_px = np.nonzero(mask)
    centroid_uv = np.array([u_px.mean(), v_px.mean()])

    uv, z_cam = _project(obs["T_world_cam"], obs["intrinsics"], centre_world)
    if geom_name is None:
        # A small box or can: its silhouette's centroid is its centre's projection.
        assert np.linalg.norm(uv - centroid_uv) < 2.0, (uv, centroid_uv)
    else:
        # A large box (the door panel), partly hidden by the frame, whose silhouette's
        # centroid is not its centre's projection: back-project each of its pixels with
        # the depth and the camera parameters; they must land on the box, to 2 px (90%
        # of them: pixels on faces seen edge-on amplify any sub-pixel offset into depth).
        (g,) = geom_ids
        fx, fy, cx, cy = obs["intrinsics"].astype(np.float64)
        z = obs["depth_m"][v_px, u_px].astype(np.float64)
        p_cam = np.stack([(u_px - cx) * z / fx, (v_px - cy) * z / fy, z, np.ones_like(z)])
        p_world = (obs["T_world_cam"].astype(np.float64) @ p_cam)[:3]
        R_world_geom = sim.data.geom_xmat[g].reshape(3, 3)
        p_geom = R_world_geom.T @ (p_world - centre_world[:, None])
        slack_m = 2.0 * z.max() / fx
        outside_m = (np.abs(p_geom) - sim.model.geom_size[g][:, None]).max(axis=0)
        assert np.quantile(outside_m, 0.9) < slack_m, (np.quantile(outside_m, 0.9), slack_m)

    # The projection falls on the body's pixels, and the depth there is the body's near
    # surface: in front of its centre by at most its bounding radius.
    dist_px = np.hypot(u_px - uv[0], v_px - uv[1])
    assert dist_px.min() <= 1.0, dist_px.min()
    v, u = v_px[dist_px.argmin()], u_px[dist_px.argmin()]
    radius = max(sim.model.geom_rbound[g] for g in geom_ids)
    assert z_cam - radius - 0.005 < obs["depth_m"][v, u] < z_cam + 0.005
