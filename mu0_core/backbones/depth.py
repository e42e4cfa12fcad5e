"""Depth as an image: metric depth rendered through a colormap, so an RGB encoder can read it.

The reference model feeds depth to its vision encoder as a colormap image. Depth is
normalised per image between robust percentiles of its valid pixels and mapped with a
turbo-like colormap (a fixed polynomial fit, so no matplotlib at run time); invalid
pixels (0, negative, NaN, inf) come out black.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Polynomial approximation of Google's Turbo colormap (published coefficients, degree 5).
_TURBO_R = (0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943)
_TURBO_G = (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604)
_TURBO_B = (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973)


def _poly(x: Tensor, coeffs: tuple[float, ...]) -> Tensor:
    out = torch.zeros_like(x)
    for c in reversed(coeffs):
        out = out * x + c
    return out


def depth_to_colormap(depth_m: Tensor, lo_q: float = 0.02, hi_q: float = 0.98) -> Tensor:
    """float[B, H, W] metres → float32[B, H, W, 3] in [0, 1]; near is blue, far is red."""
    if depth_m.ndim != 3:
        raise ValueError(f"depth_m must be [B, H, W], got shape {tuple(depth_m.shape)}")
    depth = depth_m.float()
    valid = torch.isfinite(depth) & (depth > 0)
    B = depth.shape[0]
    flat = torch.where(valid, depth, torch.nan).reshape(B, -1)  # [B, H*W]
    lo = torch.nanquantile(flat, lo_q, dim=1)  # [B]; NaN when an image has no valid pixel
    hi = torch.nanquantile(flat, hi_q, dim=1)
    lo = torch.nan_to_num(lo, nan=0.0)[:, None, None]
    hi = torch.nan_to_num(hi, nan=1.0)[:, None, None]
    x = ((depth - lo) / (hi - lo).clamp_min(1e-3)).clamp(0.0, 1.0)
    x = torch.where(valid, x, torch.zeros_like(x))
    rgb = torch.stack([_poly(x, _TURBO_R), _poly(x, _TURBO_G), _poly(x, _TURBO_B)], dim=-1)
    rgb = rgb.clamp(0.0, 1.0) * valid[..., None]
    return rgb
