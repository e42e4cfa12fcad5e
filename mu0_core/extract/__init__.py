"""TraceExtract: 3D point traces from RGB-D episodes, from pixels alone.

Stages, one module each:
- ``sources``: episodes in (our LeRobot v3 recordings, any LeRobot v3 dataset with depth,
  a folder of RGB and depth frames with intrinsics);
- ``keypoints``: which pixels to follow (motion saliency + feature clustering);
- ``tracking``: 2D tracks (pyramidal Lucas–Kanade, forward–backward checked; pluggable);
- ``lifting``: depth + intrinsics + camera pose -> one world frame;
- ``segments``: motion segments and hierarchical captions (rule-based, pluggable);
- ``pipeline``: one episode end to end, and the parallel runner (processes or Ray).

OpenCV is imported lazily, inside the functions that need it (the ``mu0[sim]`` extra).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

CV2_HINT = "TraceExtract needs OpenCV: pip install 'mu0[sim]'"


def import_cv2():
    """cv2, or an ImportError that names the extra to install."""
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise ImportError(f"{CV2_HINT} ({e})") from e
    return cv2


class ExtractError(ValueError):
    """Bad input for one episode (missing depth, mismatched sizes, empty); names the episode."""

    def __init__(self, episode_id: str, message: str):
        super().__init__(f"episode {episode_id}: {message}")
        self.episode_id = episode_id


def make_plugin(
    kind: str, registry: dict[str, Callable[..., Any]], name: str, **kwargs: Any
) -> Any:
    """A pluggable stage (tracker, captioner) by registered name or ``"package.module:factory"``."""
    if name in registry:
        return registry[name](**kwargs)
    if ":" in name:
        module, attr = name.split(":", 1)
        return getattr(importlib.import_module(module), attr)(**kwargs)
    raise ValueError(
        f"unknown {kind} {name!r}; registered: {sorted(registry)} (or 'module:factory')"
    )
