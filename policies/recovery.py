"""Recovery demonstrations: the expert drives, then the scripted demonstrator takes over.

An expert trained on clean demonstrations drifts, at run time, into states its data never
shows (a cube held too high, carried past the goal, dropped on the way) and has not learnt
what to do there. To teach it (the idea of DAgger, with the demonstrator acting rather than
only labelling), an episode starts in closed loop exactly as `mu0 eval-policy` runs it (the
expert, μ0's traces from a trace server), and at a step drawn from ``handover`` the task's
scripted demonstrator takes over and finishes the task from wherever the expert left it. The
recording keeps every frame (so the gripper history is right) and the frame of the handover;
training keeps only the demonstrator's frames (`policies.data.first_kept_frame`).

    mu0 collect --task Stack --robot UR5e --expert checkpoints/experts/UR5e \\
        --handover 90 260 --episodes 70 --seed 700 --only-success --out data/...
"""

from __future__ import annotations

from typing import Any

import numpy as np

from policies.control import Handover, LoopConfig, run_episode


def recovery_rollout(
    task: str,
    expert,
    client,
    handover: tuple[int, int],
    max_steps: int,
    cfg: LoopConfig | None = None,
    expert_name: str = "",
):
    """A `envs.collect.Rollout`: the expert (condition ``mu0``) until a step drawn uniformly
    from ``handover`` (first, last; per seed, reproducibly), then the demonstrator. An episode
    in which the demonstrator never took over is not kept (returns None)."""
    from envs.demos import PickAndPlace, make_demonstrator

    first, last = handover
    if not 0 <= first <= last < max_steps:
        raise ValueError(f"handover steps {first}..{last} must lie in 0..{max_steps - 1}")
    if not isinstance(make_demonstrator(task), PickAndPlace):
        raise ValueError(
            f"recovery demonstrations need a demonstrator that picks up mid-task; {task}'s "
            "cannot (pick-and-place tasks can: Lift, Stack, PickPlaceCan)"
        )

    def rollout(env, seed: int, rec) -> tuple[bool, dict[str, Any]] | None:
        step = int(np.random.default_rng(seed).integers(first, last + 1))
        ho = Handover(step, make_demonstrator(task))
        res = run_episode(
            env,
            expert,
            "mu0",
            seed,
            client=client,
            cfg=cfg,
            max_steps=max_steps,
            handover=ho,
            on_step=rec.add,
        )
        if ho.taken_at is None:
            return None
        return res.success, {
            "handover_frame": ho.taken_at,
            "handover_drawn": step,
            "expert": expert_name,
        }

    return rollout
