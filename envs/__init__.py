"""Gymnasium environments for μ0: robosuite tasks, and the ids they are registered under.

Importing this package needs neither robosuite nor mujoco; only `register_all()` (which
needs gymnasium) and the modules it points at (`envs.robosuite_env`, `envs.demos`, which
need the `sim` extra) do.

    import gymnasium as gym
    import envs

    envs.register_all()
    env = gym.make("mu0/Lift-Panda-v0")
"""

from __future__ import annotations

from typing import Any

# Tasks and robots are plain strings here so that listing them costs no heavy import.
TASKS: tuple[str, ...] = ("Lift", "Stack", "PickPlaceCan", "Door")
ROBOTS: tuple[str, ...] = ("Panda", "UR5e", "Kinova3", "IIWA")

INSTRUCTIONS: dict[str, str] = {
    "Lift": "pick up the cube",
    "Stack": "stack the red cube on the green cube",
    "PickPlaceCan": "put the can in its bin",
    "Door": "open the door",
}

# Episode limits at 20 Hz control; the scripted demonstrators finish well inside them.
MAX_EPISODE_STEPS: dict[str, int] = {"Lift": 200, "Stack": 300, "PickPlaceCan": 400, "Door": 300}

SIM_EXTRA_HINT = "pip install 'mu0[sim]'"


def env_id(task: str, robot: str) -> str:
    """The gymnasium id of one task × robot, e.g. `mu0/Lift-Panda-v0`."""
    return f"mu0/{task}-{robot}-v0"


def registered_ids() -> list[str]:
    """Every id `register_all()` registers, in a stable order."""
    return [env_id(task, robot) for task in TASKS for robot in ROBOTS]


def register_all() -> list[str]:
    """Register every task × robot with gymnasium (idempotent); return the ids.

    Registration is lazy: robosuite is imported only when an environment is made.
    """
    try:
        import gymnasium
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise ImportError(f"envs.register_all needs gymnasium: {SIM_EXTRA_HINT}") from e

    ids = registered_ids()
    for task in TASKS:
        for robot in ROBOTS:
            name = env_id(task, robot)
            if name in gymnasium.registry:
                continue
            gymnasium.register(
                id=name,
                entry_point="envs.robosuite_env:RobosuiteTraceEnv",
                max_episode_steps=MAX_EPISODE_STEPS[task],
                kwargs={"task": task, "robot": robot},
            )
    return ids


def __getattr__(name: str) -> Any:
    # Heavy classes resolve on first use, so `import envs` stays cheap and sim-free.
    if name == "RobosuiteTraceEnv":
        from envs.robosuite_env import RobosuiteTraceEnv

        return RobosuiteTraceEnv
    if name == "make_demonstrator":
        from envs.demos import make_demonstrator

        return make_demonstrator
    raise AttributeError(f"module 'envs' has no attribute {name!r}")


__all__ = [
    "INSTRUCTIONS",
    "MAX_EPISODE_STEPS",
    "ROBOTS",
    "TASKS",
    "RobosuiteTraceEnv",
    "env_id",
    "make_demonstrator",
    "register_all",
    "registered_ids",
]
