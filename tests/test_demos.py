"""The scripted demonstrators succeed: a fast check on Panda, and the full sweep (slow)."""

from __future__ import annotations

import pytest

import envs

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module")
def demos():
    pytest.importorskip("robosuite")
    from envs import demos

    return demos


@pytest.mark.parametrize("task", envs.TASKS)
def test_demonstrator_succeeds_on_panda(demos, task):
    from envs.robosuite_env import RobosuiteTraceEnv

    env = RobosuiteTraceEnv(task, "Panda", render_images=False)
    try:
        succeeded, steps = demos.run_episode(env, seed=0)
    finally:
        env.close()
    assert succeeded, f"{task} demonstrator failed on Panda, seed 0, after {steps} steps"
    assert steps <= envs.MAX_EPISODE_STEPS[task]


def test_demonstrator_drives_a_gymnasium_env(demos):
    gymnasium = pytest.importorskip("gymnasium")
    envs.register_all()
    env = gymnasium.make("mu0/Lift-Panda-v0", render_images=False)
    demo = demos.make_demonstrator("Lift")
    try:
        _, info = env.reset(seed=1)
        for _ in range(envs.MAX_EPISODE_STEPS["Lift"]):
            _, _, _, truncated, info = env.step(demo(env))
            if info["success"] or truncated:
                break
    finally:
        env.close()
    assert info["success"]


@pytest.mark.slow
@pytest.mark.parametrize("task", envs.TASKS)
@pytest.mark.parametrize("robot", envs.ROBOTS)
def test_demonstrator_sweep(demos, task, robot):
    rates = demos.measure((task,), (robot,), episodes=50)
    assert rates[(task, robot)] >= 0.9
