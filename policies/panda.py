"""Franka Panda: 7 joints, parallel-jaw hand (2 finger joints): proprio is 3 + 4 + 2 + 7."""

from policies.base import ActionExpertConfig
from policies.registry import register


@register("Panda")
def panda(instructions: list[str]) -> ActionExpertConfig:
    return ActionExpertConfig(embodiment="Panda", proprio_dim=16, instructions=instructions)
