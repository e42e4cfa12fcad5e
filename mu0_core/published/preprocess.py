"""What a camera gives -> what the published μ0 reads, in the reference's conventions.

- RGB: uint8 (or float in [0, 1]) of any size, resized to the release's square input with
  bilinear interpolation (no antialiasing, not aspect-preserving), as the reference dataset does.
- Depth: metres with holes (0, negative or non-finite = unknown) rendered as a turbo colour
  image on a log scale over the release's ``normalizer_stats.json`` range (near = bright, unknown
  = the far end), at the camera's size, then resized like RGB.
- Prompt: ``"Task: {instruction}\\n"`` (empty -> "predict future trajectory"), right-padded
  to the release's token length.
- Keypoints: the reference normalises pixels as ``2 u / W - 1`` (pixel edges at integers);
  ours are pixel-centre aligned, ``(2 u + 1) / W - 1``. ``ours_to_reference_uv`` and
  ``reference_to_ours_uv`` are the only places that convert.
- History: reference ``h`` past steps (oldest first) relative to the current position, zero
  where unknown; ours are absolute with the current position last.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

DEFAULT_TASK = "predict future trajectory"


def _turbo_lut() -> np.ndarray:
    """float32[256, 3]: Anton Mikhailov's polynomial fit of the turbo colormap (the reference's
    LUT; a 6th-order polynomial per channel, clipped to [0, 1])."""
    coef = np.array(
        [
            [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
            [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
            [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
        ]
    )
    x = np.linspace(0.0, 1.0, 256)
    powers = np.stack([x**k for k in range(6)], axis=1)  # (256, 6)
    return np.clip(powers @ coef.T, 0.0, 1.0).astype(np.float32)


TURBO_LUT = _turbo_lut()


def render_depth(depth_m: np.ndarray, log_min: float, log_max: float) -> np.ndarray:
    """float32[H, W] metres -> float32[H, W, 3] turbo colours in [0, 1]."""
    if depth_m.ndim != 2:
        raise ValueError(f"depth must be [H, W] metres, got shape {depth_m.shape}")
    d = np.asarray(depth_m, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(d) & (d > 1e-3)
    lo, hi = float(np.exp(log_min)), float(np.exp(log_max))
    log_d = np.log(np.where(valid, np.clip(d, lo, hi), lo))
    near = 1.0 - (log_d - log_min) / max(log_max - log_min, 1e-6)  # 1 = nearest
    near = np.where(valid, near, 0.0)
    return TURBO_LUT[np.clip((near * 255.0).astype(np.int32), 0, 255)]


def resize_images(images: Tensor, size: int) -> Tensor:
    """float[B, 3, H, W] -> float[B, 3, size, size], bilinear, half-pixel centres."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def rgb_to_tensor(rgb: np.ndarray | Tensor) -> Tensor:
    """uint8 or float [0, 1] images [B, H, W, 3] or [B, 3, H, W] -> float32[B, 3, H, W] in [0, 1]."""
    x = torch.as_tensor(np.asarray(rgb))
    if x.ndim != 4:
        raise ValueError(
            f"images must be batched [B, H, W, 3] or [B, 3, H, W], got {tuple(x.shape)}"
        )
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x.float()


def depth_to_tensor(depth_m: np.ndarray, log_range: tuple[float, float], size: int) -> Tensor:
    """float32[B, H, W] metres -> float32[B, 3, size, size] colour image in [0, 1]."""
    rendered = np.stack([render_depth(d, *log_range) for d in np.asarray(depth_m)])
    return resize_images(torch.from_numpy(rendered).permute(0, 3, 1, 2), size)


def prompt(instruction: str) -> str:
    return f"Task: {instruction.strip() or DEFAULT_TASK}\n"


def tokenize(tokenizer, instructions: list[str], max_length: int) -> tuple[Tensor, Tensor]:
    """(int64[B, L], bool[B, L]): prompts right-padded (and truncated) to the release length."""
    tokenizer.padding_side = "right"
    enc = tokenizer(
        [prompt(t) for t in instructions],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
    )
    return enc["input_ids"].long(), enc["attention_mask"].bool()


def ours_to_reference_uv(uv: np.ndarray, width: int, height: int) -> np.ndarray:
    """Our pixel-centre uv -> the reference's 2 u_px / W - 1 (a shift of one pixel's half-width
    times two: u_ref = u_ours - 1 / W)."""
    shift = np.array([1.0 / width, 1.0 / height], dtype=np.float32)
    return (np.asarray(uv, dtype=np.float32) - shift).astype(np.float32)


def reference_to_ours_uv(uv: np.ndarray, width: int, height: int) -> np.ndarray:
    shift = np.array([1.0 / width, 1.0 / height], dtype=np.float32)
    return (np.asarray(uv, dtype=np.float32) + shift).astype(np.float32)


def history_to_reference(
    hist_uvz: np.ndarray,
    hist_valid: np.ndarray | None,
    width: int,
    height: int,
    history_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Our absolute history (current position last) -> the reference's inputs.

    hist_uvz float32[N, T, 3] (our uv, z m), hist_valid bool[N, T] or None.
    Returns current_kp float32[N, 3] (reference uv), traj_history float32[N, history_len, 3]
    (relative, oldest first, zero where unknown: the reference dataset's neutral value) and
    has_history bool[N] (a point with no known past step gets its history token masked, as
    the reference's "mask history" protocol does). Our T - 1 past steps fill the newest slots;
    older slots stay unknown.
    """
    hist = np.asarray(hist_uvz, dtype=np.float32)
    N, T, _ = hist.shape
    valid = np.ones((N, T), bool) if hist_valid is None else np.asarray(hist_valid, bool)
    valid = valid & np.isfinite(hist).all(-1)
    ref = hist.copy()
    ref[..., :2] = ours_to_reference_uv(hist[..., :2], width, height)
    current = ref[:, -1]
    past = min(T - 1, history_len)
    traj = np.zeros((N, history_len, 3), np.float32)
    known = np.zeros((N, history_len), bool)
    if past > 0:
        rel = ref[:, T - 1 - past : T - 1] - current[:, None]
        ok = valid[:, T - 1 - past : T - 1]
        traj[:, history_len - past :] = np.where(ok[..., None], rel, 0.0)
        known[:, history_len - past :] = ok
    return current.astype(np.float32), traj, known.any(axis=1)
