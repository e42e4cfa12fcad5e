"""The contract between the trace server and a model: ``TraceModel`` plus a trivial one.

The server knows nothing about μ0; it calls a ``TraceModel`` adapter. Observations and
predictions are plain dicts of numpy arrays, exactly the fields that travel on the wire
(docs/protocol.md, "predict"). ``EchoTraceModel`` holds every point still and can sleep
to emulate compute; tests and benchmarks serve it. No torch import at module level.
"""

from __future__ import annotations

import math
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
    "traces_uvz": "absolute, the forecast over the horizon (step 0 = now): the next H frames "
    "for our models, the path re-timed by arc length for the published μ0",
}


@runtime_checkable
class TraceModel(Protocol):
    """What the server calls. ``predict_batch`` runs on the server's inference thread only;
    ``validate`` on whichever thread watches the socket, which may be a helper thread while
    ``predict_batch`` runs, so it must be cheap and must not touch the model's state."""

    def metadata(self) -> dict[str, Any]:
        """model_id, model_hash, horizon, image_size [w, h], max_queries, history_steps,
        frames (a dict of strings as FRAMES_AND_UNITS); msgpack-able values only."""
        ...

    def validate(self, obs: dict[str, Any]) -> None:
        """Raise WireError(BAD_SHAPE / BAD_DTYPE / BAD_VALUE / MALFORMED) if one request
        cannot run: the server answers it with that error and never hands it to the model."""
        ...

    def predict_batch(self, observations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One prediction dict per observation, same order: traces_uvz float32[N, H, 3],
        traces_xyz_cam float32[N, H, 3], done bool[N, H]."""
        ...


_DTYPES = {name: np.dtype(name) for name in ("uint8", "float32", "bool")}
_OBS_FIELDS = frozenset({"rgb", "depth_m", "instruction", "hist_uvz", "hist_valid", "intrinsics"})
# Value ranges of an observation (docs/protocol.md, "predict"). Beyond them a model computes
# NaN or inf (|u| = 1e30, fx = 0) or spends a forward pass on nonsense; a tokenizer takes
# 0.5 s over a 500,000-character instruction, a delay every request batched with it shares.
# The image spans [-1, 1]; points well outside it are real (a gripper leaving the view:
# run-real sends u = -4.7), and the tiny μ0 stays finite up to |u| = 1e8, not at 1e30.
MAX_ABS_UV = 1000.0
MAX_Z_M = 1000.0  # the fast path below relies on MAX_Z_M >= MAX_ABS_UV
MAX_INSTRUCTION_CHARS = 2048


def _require(obs: dict[str, Any], key: str, dtype: str, shape: tuple[int | None, ...]) -> None:
    """Check one array field; ``None`` in ``shape`` accepts any size on that axis."""
    value = obs.get(key)
    if not isinstance(value, np.ndarray):
        raise WireError(ErrorCode.MALFORMED, f"'{key}' must be an array")
    if value.dtype != _DTYPES[dtype]:
        raise WireError(ErrorCode.BAD_DTYPE, f"'{key}' must be {dtype}, got {value.dtype}")
    got = value.shape
    ok = len(got) == len(shape)
    if ok:
        for want, size in zip(shape, got):  # a plain loop: this runs on every request
            if want is not None and want != size:
                ok = False
                break
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise WireError(ErrorCode.BAD_SHAPE, f"'{key}' must be {dtype}{want}, got {list(got)}")


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
    unknown = obs.keys() - _OBS_FIELDS
    if unknown:
        raise WireError(ErrorCode.MALFORMED, f"unknown observation fields {sorted(unknown)}")
    w, h = image_size if image_size is not None else (None, None)
    _require(obs, "rgb", "uint8", (h, w, 3))
    H, W = obs["rgb"].shape[:2]
    if H < 1 or W < 1:
        raise WireError(ErrorCode.BAD_SHAPE, f"'rgb' is {W}x{H}; an image needs pixels")
    if obs.get("depth_m") is not None:
        _require(obs, "depth_m", "float32", (H, W))  # 0, negative or non-finite = unknown
    instruction = obs.get("instruction")
    if not isinstance(instruction, str):
        raise WireError(ErrorCode.MALFORMED, "'instruction' must be a string")
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise WireError(
            ErrorCode.BAD_VALUE,
            f"'instruction' has {len(instruction)} characters; at most {MAX_INSTRUCTION_CHARS}",
        )
    _require(obs, "hist_uvz", "float32", (None, history_steps, 3))
    N = obs["hist_uvz"].shape[0]
    if not 1 <= N <= max_queries:
        raise WireError(ErrorCode.BAD_SHAPE, f"query count {N} not in [1, {max_queries}]")
    if obs.get("hist_valid") is not None:
        _require(obs, "hist_valid", "bool", (N, history_steps))
    _require(obs, "intrinsics", "float32", (4,))
    _check_values(obs, W, H)


def _check_values(obs: dict[str, Any], W: int, H: int) -> None:
    """WireError(BAD_VALUE) naming the field, for values a model cannot use."""
    fx, fy, cx, cy = obs["intrinsics"].tolist()
    if not all(map(math.isfinite, (fx, fy, cx, cy))):
        raise WireError(ErrorCode.BAD_VALUE, f"'intrinsics' must be finite, got {[fx, fy, cx, cy]}")
    if fx <= 0 or fy <= 0:
        raise WireError(ErrorCode.BAD_VALUE, f"'intrinsics' fx, fy must be > 0, got {fx}, {fy}")
    if not (0 <= cx <= W and 0 <= cy <= H):
        raise WireError(
            ErrorCode.BAD_VALUE,
            f"'intrinsics' principal point ({cx}, {cy}) must lie inside the {W}x{H} image",
        )
    hist = obs["hist_uvz"]
    # Fast path for the common case, every value within +-MAX_ABS_UV and every z > 0:
    # three reductions (NaN fails their comparisons) instead of the masked check below.
    if (
        float(hist.min()) >= -MAX_ABS_UV
        and float(hist.max()) <= MAX_ABS_UV
        and float(hist[..., 2].min()) > 0
    ):
        return
    # Invalid steps are masked out by the model; the last step is the current position,
    # which the model uses whatever its flag says.
    valid = obs.get("hist_valid")
    needed = np.ones(hist.shape[:2], bool) if valid is None else valid.copy()
    needed[:, -1] = True
    with np.errstate(invalid="ignore"):  # NaN compares False: counted as out of range
        usable = (np.abs(hist[..., :2]) <= MAX_ABS_UV).all(-1)
        usable &= (hist[..., 2] > 0) & (hist[..., 2] <= MAX_Z_M)
    bad = needed & ~usable
    if bad.any():
        i, t = np.argwhere(bad)[0].tolist()
        raise WireError(
            ErrorCode.BAD_VALUE,
            f"'hist_uvz'[{i}, {t}] = {hist[i, t].tolist()}: a valid step (and the last one) "
            f"needs finite |u|, |v| <= {MAX_ABS_UV:g} and 0 < z <= {MAX_Z_M:g} m",
        )


def uvz_to_xyz_cam(
    uvz: np.ndarray,
    intrinsics: np.ndarray,
    width: int,
    height: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """float32[..., 3] (normalised uv, z m) -> float32[..., 3] OpenCV camera frame, metres
    (into ``out`` when given)."""
    fx, fy, cx, cy = np.asarray(intrinsics).tolist()
    # u_px = ((u + 1) W - 1) / 2 inverts u = (2 u_px + 1) / W - 1; x = (u_px - cx) z / fx,
    # so x / z = u W / (2 fx) + ((W - 1) / 2 - cx) / fx, and likewise for y.
    scale, offset = np.array(
        [
            [width / (2 * fx), height / (2 * fy), 0.0],
            [((width - 1) / 2 - cx) / fx, ((height - 1) / 2 - cy) / fy, 1.0],
        ],
        np.float32,
    )
    out = np.multiply(uvz, scale, out=out, dtype=np.float32)
    out += offset
    out *= uvz[..., 2:3]
    return out


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
            hist = obs["hist_uvz"]
            n, (h_img, w_img) = hist.shape[0], obs["rgb"].shape[:2]
            traces = np.empty((2, n, self.horizon, 3), np.float32)  # uvz and xyz, one buffer
            traces[0, :, 0] = hist[:, -1]  # the current position...
            uvz_to_xyz_cam(traces[0, :, 0], obs["intrinsics"], w_img, h_img, out=traces[1, :, 0])
            traces[:, :, 1:] = traces[:, :, :1]  # ...at every step of the horizon
            done = np.zeros((n, self.horizon), dtype=bool)
            out.append({"traces_uvz": traces[0], "traces_xyz_cam": traces[1], "done": done})
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
