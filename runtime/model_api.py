"""The contract between the trace server and a model: ``TraceModel`` plus a trivial one.

The server knows nothing about μ0; it calls a ``TraceModel`` adapter. Observations and
predictions are plain dicts of numpy arrays, exactly the fields that travel on the wire
(docs/protocol.md, "predict"). ``EchoTraceModel`` holds every point still and can sleep
to emulate compute; tests and benchmarks serve it. No torch import at module level.
"""

from __future__ import annotations

import time
from typing import Any, Protocol, runtime_checkable

import numpy as np

from runtime.wire import ErrorCode, WireError

HISTORY_STEPS = 8
HORIZON = 32

# Frames and units of the wire fields, returned in the handshake so a client can check
# it reads the numbers the way the server means them (DESIGN.md, "Frames and units").
FRAMES_AND_UNITS = {
    "uv": "normalised image coords in [-1, 1], OpenCV (origin top-left, v down), "
    "pixel-centre aligned: u_norm = (2 u_px + 1) / W - 1",
    "z": "depth along the camera's optical axis, metres",
    "xyz_cam": "OpenCV camera frame (x right, y down, z forward), metres",
    "intrinsics": "fx, fy, cx, cy in pixels of the sent image",
    "hist_uvz": "absolute; the last of the history steps is the current position",
    "traces_uvz": "absolute, re-timed by arc length over the horizon",
}


@runtime_checkable
class TraceModel(Protocol):
    """What the server calls. ``predict_batch`` runs on the server's inference worker only;
    ``validate`` and ``metadata`` on the socket thread, so they must be cheap."""

    def metadata(self) -> dict[str, Any]:
        """model_id, model_hash, horizon, image_size [w, h], max_queries, history_steps,
        frames (a dict of strings as FRAMES_AND_UNITS); msgpack-able values only."""
        ...

    def validate(self, obs: dict[str, Any]) -> None:
        """Raise WireError(BAD_SHAPE / BAD_DTYPE / MALFORMED) if one request cannot run."""
        ...

    def predict_batch(self, observations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One prediction dict per observation, same order: traces_uvz float32[N, H, 3],
        traces_xyz_cam float32[N, H, 3], done bool[N, H]."""
        ...


def _require(obs: dict[str, Any], key: str, dtype: str, shape: tuple[int | None, ...]) -> None:
    """Check one array field; ``None`` in ``shape`` accepts any size on that axis."""
    value = obs.get(key)
    if not isinstance(value, np.ndarray):
        raise WireError(ErrorCode.MALFORMED, f"'{key}' must be an array")
    if value.dtype != np.dtype(dtype):
        raise WireError(ErrorCode.BAD_DTYPE, f"'{key}' must be {dtype}, got {value.dtype}")
    if value.ndim != len(shape) or any(
        s is not None and s != d for s, d in zip(shape, value.shape)
    ):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise WireError(
            ErrorCode.BAD_SHAPE, f"'{key}' must be {dtype}{want}, got {list(value.shape)}"
        )


def validate_observation(
    obs: dict[str, Any],
    image_size: tuple[int, int] | None,
    max_queries: int,
    history_steps: int = HISTORY_STEPS,
) -> None:
    """The wire contract of one observation, shared by adapters. ``image_size`` is
    (width, height); ``None`` accepts any size (the model resizes)."""
    if not isinstance(obs, dict):
        raise WireError(ErrorCode.MALFORMED, "observation must be a map")
    w, h = image_size if image_size is not None else (None, None)
    _require(obs, "rgb", "uint8", (h, w, 3))
    H, W = obs["rgb"].shape[:2]
    if obs.get("depth_m") is not None:
        _require(obs, "depth_m", "float32", (H, W))
    if not isinstance(obs.get("instruction"), str):
        raise WireError(ErrorCode.MALFORMED, "'instruction' must be a string")
    _require(obs, "hist_uvz", "float32", (None, history_steps, 3))
    N = obs["hist_uvz"].shape[0]
    if not 1 <= N <= max_queries:
        raise WireError(ErrorCode.BAD_SHAPE, f"query count {N} not in [1, {max_queries}]")
    if obs.get("hist_valid") is not None:
        _require(obs, "hist_valid", "bool", (N, history_steps))
    _require(obs, "intrinsics", "float32", (4,))
    unknown = set(obs) - {"rgb", "depth_m", "instruction", "hist_uvz", "hist_valid", "intrinsics"}
    if unknown:
        raise WireError(ErrorCode.MALFORMED, f"unknown observation fields {sorted(unknown)}")


def uvz_to_xyz_cam(uvz: np.ndarray, intrinsics: np.ndarray, width: int, height: int) -> np.ndarray:
    """float32[..., 3] (normalised uv, z m) -> float32[..., 3] OpenCV camera frame, metres."""
    fx, fy, cx, cy = (float(x) for x in intrinsics)
    u_px = ((uvz[..., 0] + 1.0) * width - 1.0) / 2.0  # inverse of (2 u + 1) / W - 1
    v_px = ((uvz[..., 1] + 1.0) * height - 1.0) / 2.0
    z = uvz[..., 2]
    return np.stack([(u_px - cx) * z / fx, (v_px - cy) * z / fy, z], axis=-1).astype(np.float32)


class EchoTraceModel:
    """Predicts that nothing moves: every point stays at its current position.

    ``compute_s`` sleeps once per batch (not per item) to emulate a GPU forward pass whose
    cost hardly depends on batch size, which is what makes batching pay off.
    """

    def __init__(
        self,
        compute_s: float = 0.0,
        image_size: tuple[int, int] | None = (224, 224),
        max_queries: int = 64,
        horizon: int = HORIZON,
    ) -> None:
        self.compute_s = compute_s
        self.image_size = image_size
        self.max_queries = max_queries
        self.horizon = horizon

    def metadata(self) -> dict[str, Any]:
        return {
            "model_id": "echo",
            "model_hash": "echo-v1",
            "horizon": self.horizon,
            "image_size": list(self.image_size) if self.image_size else None,
            "max_queries": self.max_queries,
            "history_steps": HISTORY_STEPS,
            "frames": dict(FRAMES_AND_UNITS),
        }

    def validate(self, obs: dict[str, Any]) -> None:
        validate_observation(obs, self.image_size, self.max_queries)

    def predict_batch(self, observations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.compute_s > 0:
            time.sleep(self.compute_s)
        out = []
        for obs in observations:
            current = np.asarray(obs["hist_uvz"][:, -1, :], dtype=np.float32)  # [N, 3]
            H_img, W_img = obs["rgb"].shape[:2]
            xyz = uvz_to_xyz_cam(current, obs["intrinsics"], W_img, H_img)
            shape = (current.shape[0], self.horizon, 3)  # every step repeats the current one
            out.append(
                {
                    "traces_uvz": np.ascontiguousarray(np.broadcast_to(current[:, None], shape)),
                    "traces_xyz_cam": np.ascontiguousarray(np.broadcast_to(xyz[:, None], shape)),
                    "done": np.zeros(shape[:2], dtype=bool),
                }
            )
        return out


def make_observation(
    num_queries: int = 16,
    image_size: tuple[int, int] = (224, 224),
    depth: bool = True,
    seed: int = 0,
    instruction: str = "pick up the red cube",
) -> dict[str, Any]:
    """A valid random observation (for tests, benchmarks and server warm-up)."""
    rng = np.random.default_rng(seed)
    w, h = image_size
    obs: dict[str, Any] = {
        "rgb": rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8),
        "instruction": instruction,
        "hist_uvz": np.concatenate(
            [
                rng.uniform(-1, 1, size=(num_queries, HISTORY_STEPS, 2)),
                rng.uniform(0.3, 1.5, size=(num_queries, HISTORY_STEPS, 1)),
            ],
            axis=-1,
        ).astype(np.float32),
        "intrinsics": np.array([0.9 * w, 0.9 * w, w / 2, h / 2], dtype=np.float32),
    }
    if depth:
        obs["depth_m"] = rng.uniform(0.3, 2.0, size=(h, w)).astype(np.float32)
    return obs
