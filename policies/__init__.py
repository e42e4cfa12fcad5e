"""Per-embodiment action experts that turn predicted 3D traces into action chunks.

    from policies import load_expert, ExpertObservation
    expert = load_expert("checkpoints/experts/Panda")
    actions = expert.act(ExpertObservation(traces_base, trace_valid, proprio, instruction))

`policies.base` holds the shared network; `policies/<robot>.py` one small file per embodiment;
`policies.queries` picks the query points and turns server replies into base-frame traces;
`policies.train` trains an expert against the frozen μ0; `policies.control` runs the loop;
`policies.recovery` records demonstrations of recovering from where an expert drifted.
"""

from policies.base import (
    ActionExpert,
    ActionExpertConfig,
    ExpertObservation,
    load_expert,
    save_expert,
)
from policies.registry import embodiments, expert_config

__all__ = [
    "ActionExpert",
    "ActionExpertConfig",
    "ExpertObservation",
    "embodiments",
    "expert_config",
    "load_expert",
    "save_expert",
]
