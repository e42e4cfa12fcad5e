"""Camera geometry for μ0: pixels, normalised uv, depth, 3D points and rigid transforms.

Every function takes numpy arrays or torch tensors with any leading batch dims and
returns the same kind (torch results stay differentiable). The first array argument
(the points) decides the kind, dtype and device; other arguments are converted to it.

Conventions (DESIGN.md, "Frames and units"):
- pixels ``uv_px`` follow OpenCV: origin top-left, v down, pixel centres at integers;
- normalised ``uv`` lie in [-1, 1] with pixel-centre alignment, ``u = (2 u_px + 1) / W - 1``,
  so the image's outer edges map to ±1 (``grid_sample(align_corners=False)``);
- camera frame ``xyz_cam`` follows OpenCV: x right, y down, z forward, metres;
- ``T_a_b`` is a 4x4 rigid transform mapping points in frame b to frame a
  (``T_base_cam`` maps camera-frame points to the robot base).

Per-frame parameters (width, height, intrinsics) broadcast *batch-first*: a parameter
with leading shape [B] (or [B, N]) applies to points of shape [B, ..., k]; singleton
dims are inserted after the parameter's own leading dims. So intrinsics [B, 4] work with
points [B, N, H, 3] directly, and a scalar or a [4] vector applies to every point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

Array = np.ndarray | Tensor


# ---------------------------------------------------------------------------
# Small array-kind helpers: the rest of the file reads the same for numpy and torch.


def _as_float(x: Any) -> Array:
    """x as a floating array; tensors stay tensors, everything else becomes numpy."""
    if isinstance(x, Tensor):
        return x if x.is_floating_point() else x.to(torch.get_default_dtype())
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def _like(x: Any, ref: Array) -> Array:
    """x converted to the kind, dtype and device of ref."""
    if isinstance(ref, Tensor):
        if isinstance(x, np.ndarray) and not x.flags.writeable:
            x = np.array(x)  # torch warns on read-only buffers (e.g. np.broadcast_to views)
        return torch.as_tensor(x, dtype=ref.dtype, device=ref.device)
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=ref.dtype)


def _align_batch_first(p: Array, lead: tuple[int, ...], vec: int | None, name: str) -> Array:
    """Reshape a per-frame parameter so its leading dims line up with the points' first dims.

    p: [*P] (vec None) or [*P, vec], lead: the points' leading shape; returns
    [*P, 1, ..., 1] (+ [vec]) with len(lead) leading dims. Each dim of P must equal the
    points' dim or be 1: a mismatch is a bug (e.g. intrinsics of another batch), not a
    broadcast.
    """
    p_lead = tuple(p.shape if vec is None else p.shape[:-1])
    if vec is not None and (p.ndim == 0 or p.shape[-1] != vec):
        raise ValueError(f"{name} must have shape [..., {vec}], got {tuple(p.shape)}")
    if len(p_lead) > len(lead) or any(a not in (1, b) for a, b in zip(p_lead, lead)):
        raise ValueError(
            f"{name} with leading dims {p_lead} does not match points with leading dims {lead}; "
            "give one value per frame (batch-first, e.g. [B] for points [B, N, ...]) or a scalar"
        )
    pad = (1,) * (len(lead) - len(p_lead))
    tail = () if vec is None else (vec,)
    return p.reshape(p_lead + pad + tail)


def _param(p: Any, ref: Array, lead: tuple[int, ...], name: str, vec: int | None = None) -> Array:
    return _align_batch_first(_like(p, ref), lead, vec, name)


def _stack(xs: list[Array], axis: int = -1) -> Array:
    return torch.stack(xs, dim=axis) if isinstance(xs[0], Tensor) else np.stack(xs, axis=axis)


def _norm(x: Array) -> Array:
    return (
        torch.linalg.vector_norm(x, dim=-1) if isinstance(x, Tensor) else np.linalg.norm(x, axis=-1)
    )


def _transpose(x: Array) -> Array:
    return x.transpose(-1, -2) if isinstance(x, Tensor) else np.swapaxes(x, -1, -2)


def _broadcast_to(x: Array, shape: tuple[int, ...]) -> Array:
    return x.broadcast_to(shape) if isinstance(x, Tensor) else np.broadcast_to(x, shape)


def _check_last(x: Array, k: int, name: str) -> None:
    if x.ndim == 0 or x.shape[-1] != k:
        raise ValueError(f"{name} must have shape [..., {k}], got {tuple(x.shape)}")


# ---------------------------------------------------------------------------
# Intrinsics


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics (no distortion, no skew) of an image of ``width`` x ``height`` pixels."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("fx", "fy", "cx", "cy"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"Intrinsics.{name} must be finite, got {value}")
            object.__setattr__(self, name, value)  # store plain floats (JSON-safe, hashable)
        if self.fx <= 0 or self.fy <= 0:
            raise ValueError(f"focal lengths must be positive, got fx={self.fx}, fy={self.fy}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value <= 0:
                raise ValueError(f"Intrinsics.{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))

    @property
    def K(self) -> np.ndarray:
        """float64[3, 3] camera matrix."""
        return np.array(
            [[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]], dtype=np.float64
        )

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.width, self.height)

    @classmethod
    def from_K(cls, K: Any, width: int, height: int) -> Intrinsics:
        K = np.asarray(K, dtype=np.float64)
        if K.shape != (3, 3):
            raise ValueError(f"K must be 3x3, got shape {K.shape}")
        if not np.allclose(K[2], [0.0, 0.0, 1.0]) or K[1, 0] != 0.0:
            raise ValueError(f"K must be [[fx, 0, cx], [0, fy, cy], [0, 0, 1]], got\n{K}")
        if abs(K[0, 1]) > 1e-9 * abs(K[0, 0]):
            # Skew is not modelled anywhere downstream; dropping it would bias every projection.
            raise ValueError(f"K has skew {K[0, 1]}; skewed cameras are not supported")
        return cls(K[0, 0], K[1, 1], K[0, 2], K[1, 2], width, height)

    def scaled(self, width: int, height: int) -> Intrinsics:
        """Intrinsics of this image resized to ``width`` x ``height`` (no crop).

        Pixel centres map as u' = (u + 0.5) * sx - 0.5, so cx shifts by the same rule and a
        3D point projects to the same place on the resized image.
        """
        sx, sy = width / self.width, height / self.height
        return Intrinsics(
            fx=self.fx * sx,
            fy=self.fy * sy,
            cx=(self.cx + 0.5) * sx - 0.5,
            cy=(self.cy + 0.5) * sy - 0.5,
            width=width,
            height=height,
        )

    def as_array(self) -> np.ndarray:
        """float32[4] (fx, fy, cx, cy), the layout of ``TraceBatch.intrinsics``."""
        return np.array([self.fx, self.fy, self.cx, self.cy], dtype=np.float32)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "fx": self.fx,
            "fy": self.fy,
            "cx": self.cx,
            "cy": self.cy,
            "width": self.width,
            "height": self.height,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Intrinsics:
        expected = {"fx", "fy", "cx", "cy", "width", "height"}
        missing, unknown = expected - d.keys(), d.keys() - expected
        if missing or unknown:
            raise ValueError(
                f"intrinsics dict: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}"
            )
        return cls(**{k: d[k] for k in expected})


# ---------------------------------------------------------------------------
# Pixels <-> normalised uv


def pixels_to_uv(uv_px: Array, width: Any, height: Any) -> Array:
    """uv_px: [..., 2] pixels -> uv: [..., 2] in [-1, 1] (pixel-centre convention).

    width, height: scalars or per-frame arrays, broadcast batch-first over the leading dims.
    """
    uv_px = _as_float(uv_px)
    _check_last(uv_px, 2, "uv_px")
    lead = tuple(uv_px.shape[:-1])
    W, H = _param(width, uv_px, lead, "width"), _param(height, uv_px, lead, "height")
    return _stack([(2 * uv_px[..., 0] + 1) / W - 1, (2 * uv_px[..., 1] + 1) / H - 1])


def uv_to_pixels(uv: Array, width: Any, height: Any) -> Array:
    """uv: [..., 2] in [-1, 1] -> uv_px: [..., 2] pixels; the inverse of ``pixels_to_uv``."""
    uv = _as_float(uv)
    _check_last(uv, 2, "uv")
    lead = tuple(uv.shape[:-1])
    W, H = _param(width, uv, lead, "width"), _param(height, uv, lead, "height")
    return _stack([((uv[..., 0] + 1) * W - 1) / 2, ((uv[..., 1] + 1) * H - 1) / 2])


# ---------------------------------------------------------------------------
# Pixels + depth <-> camera-frame points


def unproject(uv_px: Array, depth_m: Array, fx: Any, fy: Any, cx: Any, cy: Any) -> Array:
    """uv_px: [..., 2] pixels, depth_m: [...] (z along the optical axis) -> xyz_cam: [..., 3]."""
    uv_px = _as_float(uv_px)
    _check_last(uv_px, 2, "uv_px")
    lead = tuple(uv_px.shape[:-1])
    z = _like(depth_m, uv_px)
    fx, fy, cx, cy = (
        _param(p, uv_px, lead, n) for p, n in zip((fx, fy, cx, cy), "fx fy cx cy".split())
    )
    x = (uv_px[..., 0] - cx) / fx * z
    y = (uv_px[..., 1] - cy) / fy * z
    return _stack([x, y, z + 0 * x])  # + 0*x broadcasts z to the points' shape


def project(xyz_cam: Array, fx: Any, fy: Any, cx: Any, cy: Any) -> tuple[Array, Array]:
    """xyz_cam: [..., 3] -> (uv_px: [..., 2], z: [...]).

    No clamping: points with z <= 0 (behind the camera) give meaningless or non-finite
    pixels; mask them with ``z > 0``. Keeping the division raw keeps gradients honest.
    """
    xyz_cam = _as_float(xyz_cam)
    _check_last(xyz_cam, 3, "xyz_cam")
    lead = tuple(xyz_cam.shape[:-1])
    fx, fy, cx, cy = (
        _param(p, xyz_cam, lead, n) for p, n in zip((fx, fy, cx, cy), "fx fy cx cy".split())
    )
    x, y, z = xyz_cam[..., 0], xyz_cam[..., 1], xyz_cam[..., 2]
    return _stack([fx * x / z + cx, fy * y / z + cy]), z


def uvz_to_xyz(uvz: Array, intrinsics_4: Any, image_size_2: Any) -> Array:
    """uvz: [..., 3] (normalised uv, depth m) -> xyz_cam: [..., 3] metres.

    intrinsics_4: [*P, 4] (fx, fy, cx, cy) pixels; image_size_2: [*P, 2] (width, height);
    *P is a prefix of the leading dims (e.g. [B, 4] with uvz [B, N, H, 3]).
    """
    uvz = _as_float(uvz)
    _check_last(uvz, 3, "uvz")
    lead = tuple(uvz.shape[:-1])
    k = _param(intrinsics_4, uvz, lead, "intrinsics_4", vec=4)
    size = _param(image_size_2, uvz, lead, "image_size_2", vec=2)
    uv_px = uv_to_pixels(uvz[..., :2], size[..., 0], size[..., 1])
    return unproject(uv_px, uvz[..., 2], k[..., 0], k[..., 1], k[..., 2], k[..., 3])


def xyz_to_uvz(xyz_cam: Array, intrinsics_4: Any, image_size_2: Any) -> Array:
    """xyz_cam: [..., 3] metres -> uvz: [..., 3] (normalised uv, depth m); see ``uvz_to_xyz``."""
    xyz_cam = _as_float(xyz_cam)
    _check_last(xyz_cam, 3, "xyz_cam")
    lead = tuple(xyz_cam.shape[:-1])
    k = _param(intrinsics_4, xyz_cam, lead, "intrinsics_4", vec=4)
    size = _param(image_size_2, xyz_cam, lead, "image_size_2", vec=2)
    uv_px, z = project(xyz_cam, k[..., 0], k[..., 1], k[..., 2], k[..., 3])
    uv = pixels_to_uv(uv_px, size[..., 0], size[..., 1])
    return _stack([uv[..., 0], uv[..., 1], z])


# ---------------------------------------------------------------------------
# Rigid transforms


def make_transform(R: Array, t: Any) -> Array:
    """R: [..., 3, 3], t: [..., 3] (batch dims broadcast) -> T: [..., 4, 4]."""
    R = _as_float(R)
    t = _like(t, R)
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"R must have shape [..., 3, 3], got {tuple(R.shape)}")
    _check_last(t, 3, "t")
    lib = torch if isinstance(R, Tensor) else np
    batch = tuple(lib.broadcast_shapes(tuple(R.shape[:-2]), tuple(t.shape[:-1])))
    R, t = _broadcast_to(R, batch + (3, 3)), _broadcast_to(t, batch + (3,))
    top = lib.concatenate([R, t[..., None]], -1) if lib is np else torch.cat([R, t[..., None]], -1)
    bottom = _broadcast_to(_like([[0.0, 0.0, 0.0, 1.0]], R), batch + (1, 4))
    return lib.concatenate([top, bottom], -2) if lib is np else torch.cat([top, bottom], -2)


def invert_transform(T_a_b: Array) -> Array:
    """T_a_b: [..., 4, 4] -> T_b_a: [..., 4, 4], using R^T rather than a general inverse."""
    T_a_b = _as_float(T_a_b)
    if T_a_b.shape[-2:] != (4, 4):
        raise ValueError(f"T must have shape [..., 4, 4], got {tuple(T_a_b.shape)}")
    R_t = _transpose(T_a_b[..., :3, :3])
    t = T_a_b[..., :3, 3]
    return make_transform(R_t, -(R_t @ t[..., None])[..., 0])


def transform_points(T_a_b: Array, p_b: Array) -> Array:
    """p_b: [..., 3] points in frame b -> p_a: [..., 3] in frame a.

    T_a_b: [*P, 4, 4] with *P a prefix of p_b's leading dims (batch-first), e.g. T [B, 4, 4]
    with points [B, N, 3], or a single [4, 4].
    """
    p_b = _as_float(p_b)
    _check_last(p_b, 3, "p_b")
    T = _like(T_a_b, p_b)
    if T.shape[-2:] != (4, 4):
        raise ValueError(f"T_a_b must have shape [..., 4, 4], got {tuple(T.shape)}")
    batch = tuple(T.shape[:-2])
    lead = tuple(p_b.shape[:-1])
    if len(batch) > len(lead) or any(a not in (1, b) for a, b in zip(batch, lead)):
        raise ValueError(
            f"T_a_b with batch dims {batch} does not match points with leading dims {lead}"
        )
    T = T.reshape(batch + (1,) * (len(lead) - len(batch)) + (4, 4))
    return (T[..., :3, :3] @ p_b[..., None])[..., 0] + T[..., :3, 3]


def rotation_angle_deg(R: Array) -> Array:
    """R: [..., 3, 3] -> angle of the rotation in degrees [...], in [0, 180].

    For the error between an estimate and the truth pass ``R_est @ R_true^T``. Uses
    atan2(sin, cos) rather than arccos(trace) so small angles are accurate.
    """
    R = _as_float(R)
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"R must have shape [..., 3, 3], got {tuple(R.shape)}")
    cos = (R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2] - 1) / 2
    # R - R^T = 2 sin(theta) [axis]_x, so its off-diagonal vector has norm 2 sin(theta).
    skew = _stack(
        [R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]]
    )
    sin = _norm(skew) / 2
    if isinstance(R, Tensor):
        return torch.rad2deg(torch.atan2(sin, cos))
    return np.rad2deg(np.arctan2(sin, cos))


def rotation_from_axis_angle(axis: Array, angle_rad: Any) -> Array:
    """axis: [..., 3] (any non-zero length), angle_rad: [...] -> R: [..., 3, 3] (Rodrigues)."""
    axis = _as_float(axis)
    _check_last(axis, 3, "axis")
    angle = _like(angle_rad, axis)
    n = _norm(axis)
    if bool((n < 1e-12).any()):
        raise ValueError("rotation axis must be non-zero")
    x, y, z = (axis[..., i] / n for i in range(3))
    lib = torch if isinstance(axis, Tensor) else np
    c, s = lib.cos(angle), lib.sin(angle)
    C = 1 - c
    rows = [
        c + x * x * C, x * y * C - z * s, x * z * C + y * s,
        y * x * C + z * s, c + y * y * C, y * z * C - x * s,
        z * x * C - y * s, z * y * C + x * s, c + z * z * C,
    ]  # fmt: skip
    R = _stack(rows)  # [..., 9]
    return R.reshape(tuple(R.shape[:-1]) + (3, 3))
