"""Universal Robots UR5e: 6 joints, Robotiq 2F-140 (6 gripper joints in the simulator; the
env swaps out the stock 2F-85, see envs.robosuite_env): proprio is 3 + 4 + 6 + 6."""

from policies.base import ActionExpertConfig
from policies.registry import register


@register("UR5e")
def ur5e(instructions: list[str]) -> ActionExpertConfig:
    return ActionExpertConfig(embodiment="UR5e", proprio_dim=19, instructions=instructions)
