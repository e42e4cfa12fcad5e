"""Motion segmentation into chunks, and hierarchical captions.

Segments split an episode where the gripper opens or closes and where motion pauses; each
sample records its segment, whose caption describes what is happening then (futures are a
fixed time window and may run across a segment's end). Captions are two-level: the episode's instruction, then one caption per segment.
The default captioner is rule-based (gripper events, direction of motion); a captioning
model plugs in as any callable ``(instruction, segments) -> list[str]``, registered by
name or given as ``"package.module:factory"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mu0_core.extract import make_plugin


@dataclass
class Segment:
    """Frames [start, end) and what happened in them (the facts a captioner words)."""

    start: int
    end: int
    gripper_start: float | None = None  # 1 = closed, 0 = open, None = unknown
    gripper_end: float | None = None
    displacement_world: np.ndarray | None = None  # float[3] mean net motion of moving points (m)
    path_m: float = 0.0  # mean path length of the moving points in this segment
    right_world: np.ndarray | None = None  # float[3] the camera's right, in the world
    forward_world: np.ndarray | None = None  # float[3] the camera's viewing direction
    up_world: np.ndarray | None = None  # float[3]
    rgb_start: np.ndarray | None = None  # uint8[H, W, 3], for model captioners
    rgb_end: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        return self.end - self.start


def motion_activity(xyz_world: np.ndarray, valid: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """float[F]: median speed (m / frame) of the moving points between frame t and t+1."""
    F = len(xyz_world)
    if not moving.any() or F < 2:
        return np.zeros(F)
    x, v = xyz_world[:, moving], valid[:, moving]
    step = np.linalg.norm(np.diff(x, axis=0), axis=-1)  # [F - 1, M]
    both = v[1:] & v[:-1]
    speed = np.where(both, step, np.nan)
    with np.errstate(all="ignore"):
        med = np.nanmedian(np.where(both.any(1, keepdims=True), speed, 0.0), axis=1)
    med = np.nan_to_num(med)
    smoothed = np.convolve(np.pad(med, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    return np.append(smoothed, smoothed[-1:])


def segment_episode(
    activity: np.ndarray,
    gripper_closed: np.ndarray | None,
    pause_speed_m: float = 0.0015,
    min_pause_frames: int = 4,
    min_segment_frames: int = 4,
) -> list[tuple[int, int]]:
    """[(start, end)] half-open frame ranges covering the episode.

    Boundaries: every gripper open/close event, and both ends of every pause (activity
    below ``pause_speed_m`` for at least ``min_pause_frames``). Segments shorter than
    ``min_segment_frames`` merge into their predecessor.
    """
    F = len(activity)
    cuts = {0, F}
    if gripper_closed is not None:
        g = np.asarray(gripper_closed) > 0.5
        cuts |= set((np.flatnonzero(g[1:] != g[:-1]) + 1).tolist())
    still = activity < pause_speed_m
    t = 0
    while t < F:
        if still[t]:
            u = t
            while u < F and still[u]:
                u += 1
            if u - t >= min_pause_frames:
                cuts |= {t, u}
            t = u
        else:
            t += 1
    bounds = sorted(cuts)
    segs = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    merged: list[tuple[int, int]] = []
    for a, b in segs:
        if merged and (b - a < min_segment_frames):
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    if len(merged) > 1 and merged[0][1] - merged[0][0] < min_segment_frames:
        merged[1] = (merged[0][0], merged[1][1])
        merged.pop(0)
    return merged


def _direction_words(d: np.ndarray, seg: Segment) -> str:
    """The dominant direction of a world displacement, in words from the camera's view."""
    axes = {
        "up": seg.up_world,
        "to the right": seg.right_world,
        "away from the camera": seg.forward_world,
    }
    best, best_val = "", 0.0
    for word, axis in axes.items():
        if axis is None:
            continue
        val = float(np.dot(d, axis))
        if abs(val) > abs(best_val):
            best, best_val = word, val
    if not best:
        return ""
    opposite = {
        "up": "down",
        "to the right": "to the left",
        "away from the camera": "toward the camera",
    }
    return best if best_val > 0 else opposite[best]


class RuleCaptioner:
    """Segment captions from gripper events and the direction of motion."""

    def __init__(self, still_path_m: float = 0.01):
        self.still_path_m = still_path_m

    def __call__(self, instruction: str, segments: list[Segment]) -> list[str]:
        return [self.caption(s) for s in segments]

    def caption(self, s: Segment) -> str:
        d = s.displacement_world if s.displacement_world is not None else np.zeros(3)
        direction = _direction_words(d, s)
        moved = s.path_m >= self.still_path_m
        g0, g1 = s.gripper_start, s.gripper_end
        if g0 is not None and g1 is not None and g0 < 0.5 <= g1:
            return "close the gripper to grasp the object"
        if g0 is not None and g1 is not None and g0 >= 0.5 > g1:
            return "open the gripper to release the object"
        if not moved:
            return "hold still"
        if g0 is not None and g0 >= 0.5:
            if direction == "up":
                return "lift the object"
            if direction == "down":
                return "lower the object"
            return f"carry the object {direction}".strip()
        if g0 is not None:
            return f"move the open gripper {direction}".strip()
        return f"move {direction}".strip()


CAPTIONERS: dict[str, Callable[..., Callable[[str, list[Segment]], list[str]]]] = {
    "rule": RuleCaptioner
}


def make_captioner(name: str = "rule", **kwargs: Any) -> Callable[[str, list[Segment]], list[str]]:
    """A captioner by registered name or import path ``"package.module:factory"``."""
    return make_plugin("captioner", CAPTIONERS, name, **kwargs)
