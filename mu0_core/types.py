"""Typed boundaries of the μ0 model: what goes in for training and inference, what comes out.

Conventions (see DESIGN.md, "Frames and units"):
- pixels (u, v) follow OpenCV: origin top-left, v down, pixel centres at integers;
- ``uv`` without a suffix is normalised to [-1, 1] over the image with pixel-centre
  alignment (``u_norm = (2 u + 1) / W - 1``; the image's outer edges map to ±1, as
  ``torch.nn.functional.grid_sample(align_corners=False)`` reads it);
- ``uvz`` stacks normalised (u, v) with depth z in metres along the camera's optical axis;
- ``_rel`` means relative to the point's current position (the last history step).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

# Reference model facts (DESIGN.md): 8 steps of history, 10 control points, horizon 32.
HISTORY_STEPS = 8
NUM_CONTROL_POINTS = 10
HORIZON = 32


@dataclass
class TraceBatch:
    """A training batch: B frames, up to N query points each (padded).

    Either ``rgb`` (raw pixels) or ``frozen`` (features a frozen encoder computed earlier,
    see ``Backbone.encode_frozen``) must be set; ``frozen`` wins when both are.
    """

    hist_uvz: Tensor  # float32[B, N, T_hist, 3] absolute; the last step is the current position
    hist_valid: Tensor  # bool[B, N, T_hist]
    future_uvz: Tensor  # float32[B, N, H, 3] absolute, the extracted label
    future_valid: Tensor  # bool[B, N, H]
    point_mask: Tensor  # bool[B, N]; False marks padding
    intrinsics: Tensor  # float32[B, 4] (fx, fy, cx, cy) in pixels of the original image
    image_size: Tensor  # int64[B, 2] (width, height) in pixels of the original image
    instructions: list[str]
    rgb: Tensor | None = None  # uint8[B, H_img, W_img, 3]
    depth_m: Tensor | None = None  # float32[B, H_img, W_img]; 0 or non-finite = unknown
    frozen: dict[str, Tensor] | None = None  # batch-first tensors from Backbone.encode_frozen
    group_id: Tensor | None = None  # int64[B, N]; points of one rigid part share an id, -1 = none
    # Evaluation only: the simulator's truth for the same points, where the data has it.
    gt_future_uvz: Tensor | None = None  # float32[B, N, H, 3] absolute
    gt_future_valid: Tensor | None = None  # bool[B, N, H]
    gt_part: Tensor | None = None  # int64[B, N] 0 scene, 1 arm, 2 gripper, 3 object

    @property
    def batch_size(self) -> int:
        return self.hist_uvz.shape[0]

    def to(self, device: torch.device | str) -> TraceBatch:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v.to(device, non_blocking=True)
            elif isinstance(v, dict):
                v = {k: t.to(device, non_blocking=True) for k, t in v.items()}
            out[f.name] = v
        return TraceBatch(**out)


@dataclass(frozen=True)
class TraceQuery:
    """One observation and the points to forecast, for inference (numpy or torch, no batch dim)."""

    rgb: object  # uint8[H_img, W_img, 3]
    instruction: str
    hist_uvz: object  # float32[N, T_hist, 3] absolute (normalised uv, depth m)
    intrinsics: tuple[float, float, float, float]  # fx, fy, cx, cy (pixels)
    depth_m: object | None = None  # float32[H_img, W_img] or None (RGB-only)
    hist_valid: object | None = None  # bool[N, T_hist]; None = all valid


@dataclass(frozen=True)
class TracePrediction:
    """Forecast for N query points over the horizon H (all torch, on CPU unless asked)."""

    ctrl_rel: Tensor  # float32[N, C, 3] B-spline control points, relative, uv normalised + z m
    traces_uvz_rel: Tensor  # float32[N, H, 3] relative to the current position
    traces_uvz: Tensor  # float32[N, H, 3] absolute
    done: Tensor  # bool[N, H]; True from the step where the point's motion has ended
    traces_xyz_cam: Tensor | None = None  # float32[N, H, 3] camera frame (OpenCV), metres
    timings_ms: dict[str, float] = field(default_factory=dict)
