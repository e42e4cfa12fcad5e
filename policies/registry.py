"""Per-embodiment expert definitions register here: `expert_config(robot, instructions)`."""

from __future__ import annotations

from collections.abc import Callable

from policies.base import ActionExpertConfig

ConfigFactory = Callable[[list[str]], ActionExpertConfig]
_EMBODIMENTS: dict[str, ConfigFactory] = {}


def register(robot: str) -> Callable[[ConfigFactory], ConfigFactory]:
    def deco(fn: ConfigFactory) -> ConfigFactory:
        _EMBODIMENTS[robot] = fn
        return fn

    return deco


def embodiments() -> list[str]:
    _load_all()
    return sorted(_EMBODIMENTS)


def expert_config(robot: str, instructions: list[str]) -> ActionExpertConfig:
    """The default expert configuration of one embodiment, trained on ``instructions``."""
    _load_all()
    if robot not in _EMBODIMENTS:
        raise ValueError(f"no action expert for {robot!r}; known: {sorted(_EMBODIMENTS)}")
    return _EMBODIMENTS[robot](list(instructions))


def _load_all() -> None:
    from policies import kinova3, panda, ur5e  # noqa: F401  (each registers itself)
