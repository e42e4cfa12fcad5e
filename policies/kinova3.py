"""Kinova Gen3: 7 joints, Robotiq 2F-140 (6 gripper joints in the simulator):
proprio is 3 + 4 + 6 + 7."""

from policies.base import ActionExpertConfig
from policies.registry import register


@register("Kinova3")
def kinova3(instructions: list[str]) -> ActionExpertConfig:
    return ActionExpertConfig(embodiment="Kinova3", proprio_dim=20, instructions=instructions)
