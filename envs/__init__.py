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

import os
import sys
from typing import Any


def choose_gl_backend() -> str | None:
    """Pick MuJoCo's OpenGL backend when the user has not (``MUJOCO_GL`` unset); returns it.

    MuJoCo reads ``MUJOCO_GL`` once, when it is first imported, and without it tries a
    window (GLFW), which fails on a machine without a display. robosuite sets EGL for its
    own renderer, so scenes rendered through robosuite worked while ones rendered with
    `mujoco.Renderer` did not. Every module of this package that imports mujoco is imported
    after this package, so choosing here covers every command: EGL on Linux (headless, GPU
    or Mesa), CGL on macOS, MuJoCo's own default elsewhere.
    """
    backend = os.environ.get("MUJOCO_GL")
    if not backend:
        backend = {"linux": "egl", "darwin": "cgl"}.get(sys.platform)
        if backend is None:
            return None
        os.environ["MUJOCO_GL"] = backend
    if backend in ("egl", "osmesa"):
        # PyOpenGL (robosuite's renderer) must load the same platform's functions.
        os.environ.setdefault("PYOPENGL_PLATFORM", backend)
    return backend


choose_gl_backend()

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
