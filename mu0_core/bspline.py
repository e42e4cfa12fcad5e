"""Clamped B-splines on t in [0, 1]: knots, basis matrices, fitting and evaluation.

μ0 predicts each point's future as C control points; a fixed basis matrix [H, C] turns
them into the H-step trace. Two knot layouts are supported (DESIGN.md):
- "uniform": a clamped uniform cubic B-spline, simple interior knots, C2 everywhere;
- "bezier": the reference's piecewise Bézier, interior knots repeated ``degree`` times,
  so only C0 at the joints (10 cubic control points = 3 segments).

Basis matrices are float64 numpy (computed once); ``fit`` and ``evaluate`` work on numpy
arrays and torch tensors with any leading batch dims.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mu0_core.types import HORIZON, NUM_CONTROL_POINTS

KINDS = ("uniform", "bezier")

# Masked samples are pulled towards the last valid value with HOLD_WEIGHT (valid ones weigh
# 1), and a first-difference RIDGE keeps the solve regular whatever the mask. They matter
# only where the data says nothing, and there the trace holds still instead of drifting.
# HOLD_WEIGHT must beat the default smoothing, whose second-difference penalty on its own
# would extrapolate a masked tail linearly; 1e-2 stops a tail within a fraction of a span
# while moving a fully valid fit near a mask edge by about 1% of its motion.
HOLD_WEIGHT = 1e-2
RIDGE = 1e-8


def make_knots(kind: str, num_ctrl: int, degree: int = 3) -> np.ndarray:
    """Clamped knot vector on [0, 1]: float64[num_ctrl + degree + 1]."""
    if kind not in KINDS:
        raise ValueError(f"unknown knot kind {kind!r}; expected one of {KINDS}")
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    if num_ctrl < degree + 1:
        raise ValueError(
            f"a degree-{degree} spline needs >= {degree + 1} control points, got {num_ctrl}"
        )
    ends = degree + 1  # clamped: the curve starts at ctrl[0] and ends at ctrl[-1]
    if kind == "uniform":
        interior = np.linspace(0.0, 1.0, num_ctrl - degree + 1)[1:-1]
    else:
        if (num_ctrl - 1) % degree != 0:
            raise ValueError(
                f"bezier knots need (num_ctrl - 1) % degree == 0, got num_ctrl={num_ctrl}, "
                f"degree={degree}; try num_ctrl={(num_ctrl - 1) // degree * degree + 1}"
            )
        segments = (num_ctrl - 1) // degree
        interior = np.repeat(np.arange(1, segments) / segments, degree)
    return np.concatenate([np.zeros(ends), interior, np.ones(ends)])


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (the Cox–de Boor convention 0/0 = 0)."""
    out = np.zeros(np.broadcast_shapes(num.shape, den.shape))
    np.divide(num, den, out=out, where=den != 0)
    return out


def _basis(knots: np.ndarray, t: np.ndarray, degree: int, derivative: int) -> np.ndarray:
    """Derivative ``derivative`` of all degree-``degree`` basis functions at t: [T, len(knots) - degree - 1]."""
    n = len(knots) - degree - 1
    if derivative > degree:
        return np.zeros((len(t), n))
    if degree == 0:
        # Half-open spans [k_i, k_i+1); t = 1 belongs to the last non-empty span so the
        # clamped end is included (otherwise every basis would be 0 at t = 1).
        last_span = np.nonzero(knots[:-1] < knots[1:])[0][-1]
        span = np.minimum(np.searchsorted(knots, t, side="right") - 1, last_span)
        return (np.arange(n)[None, :] == span[:, None]).astype(np.float64)
    lower = _basis(knots, t, degree - 1, max(derivative - 1, 0))  # [T, n + 1]
    left = knots[degree : degree + n] - knots[:n]  # k_{i+p} - k_i
    right = knots[degree + 1 : degree + 1 + n] - knots[1 : 1 + n]  # k_{i+p+1} - k_{i+1}
    if derivative == 0:
        a = _safe_div(t[:, None] - knots[None, :n], left[None, :])
        b = _safe_div(knots[None, degree + 1 : degree + 1 + n] - t[:, None], right[None, :])
        return a * lower[:, :n] + b * lower[:, 1:]
    # d/dt N_{i,p} = p (N_{i,p-1} / (k_{i+p} - k_i) - N_{i+1,p-1} / (k_{i+p+1} - k_{i+1}))
    return degree * (
        _safe_div(lower[:, :n], left[None, :]) - _safe_div(lower[:, 1:], right[None, :])
    )


def basis_matrix(knots: Any, t: Any, degree: int = 3, derivative: int = 0) -> np.ndarray:
    """Basis (or its ``derivative``-th derivative in t) at times t: float64[T, C].

    C = len(knots) - degree - 1. At a knot the right-hand limit is used, except t = 1
    which takes the left-hand limit (the last span), so ``basis[-1, -1] == 1`` there.
    """
    knots = np.asarray(knots, dtype=np.float64)
    t = np.atleast_1d(np.asarray(t, dtype=np.float64))
    if knots.ndim != 1 or np.any(np.diff(knots) < 0):
        raise ValueError("knots must be a non-decreasing 1-D sequence")
    if len(knots) < 2 * (degree + 1):
        raise ValueError(f"{len(knots)} knots are too few for degree {degree}")
    if derivative < 0:
        raise ValueError(f"derivative must be >= 0, got {derivative}")
    if t.ndim != 1 or np.any(t < knots[0]) or np.any(t > knots[-1]):
        raise ValueError(f"t must be a 1-D array inside [{knots[0]}, {knots[-1]}]")
    return _basis(knots, t, degree, derivative)


def _to_torch(a: Any, ref: Tensor) -> Tensor:
    """a as a tensor like ref; numpy arrays are copied (cached bases are read-only)."""
    if isinstance(a, Tensor):
        return a.to(dtype=ref.dtype, device=ref.device)
    return torch.tensor(np.array(a), dtype=ref.dtype, device=ref.device)


def _second_difference(num_ctrl: int) -> np.ndarray:
    """float64[C - 2, C]: rows (1, -2, 1), the discrete acceleration of the control polygon."""
    D = np.zeros((max(num_ctrl - 2, 0), num_ctrl))
    for i in range(num_ctrl - 2):
        D[i, i : i + 3] = (1.0, -2.0, 1.0)
    return D


def fit(
    y: Any,
    basis: Any,
    mask: Any = None,
    smoothing: float = 1e-3,
    anchor: bool = True,
) -> Any:
    """Weighted least-squares control points: y [..., T, D], basis [T, C] -> ctrl [..., C, D].

    Minimises, per batch element,
        (1/T) sum_t w_t |basis_t @ ctrl - y_t|^2 + smoothing |D2 ctrl|^2 + RIDGE |D1 ctrl|^2
    with w = mask (bool or float weights [..., T], broadcast over y's leading dims; None = all 1).
    Masked samples (w == 0) are not ignored outright: they are replaced by the last valid
    sample (or y[..., 0, :] before the first one) with weight HOLD_WEIGHT, so a mostly
    masked trace holds still at its last known position instead of drifting or exploding.
    ``anchor=True`` pins ctrl[..., 0, :] = y[..., 0, :] exactly: a clamped spline starts at its
    first control point, so the trace starts at the current position.

    numpy input: solved in float64, returned in y's dtype. torch input: solved in y's dtype
    with torch.linalg.solve, differentiable in y (and mask if float).
    """
    is_torch = isinstance(y, Tensor)
    if is_torch:
        lib = torch
        B = _to_torch(basis, y)
    else:
        lib = np
        y_dtype = (
            y.dtype
            if isinstance(y, np.ndarray) and np.issubdtype(y.dtype, np.floating)
            else np.float64
        )
        y = np.asarray(y, dtype=np.float64)
        B = np.asarray(basis, dtype=np.float64)
    if y.ndim < 2:
        raise ValueError(f"y must have shape [..., T, D], got {tuple(y.shape)}")
    if B.ndim != 2 or B.shape[0] != y.shape[-2]:
        raise ValueError(f"basis must be [T, C] with T = {y.shape[-2]}, got {tuple(B.shape)}")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    T, C = B.shape
    lead = tuple(y.shape[:-2])

    # Per-sample weights w [..., T] and which samples count as valid.
    if mask is None:
        w = lib.ones(lead + (T,), dtype=y.dtype) if is_torch else np.ones(lead + (T,))
    else:
        w = torch.as_tensor(mask, device=y.device) if is_torch else np.asarray(mask)
        if w.shape[-1:] != (T,):
            raise ValueError(f"mask must have shape [..., {T}], got {tuple(w.shape)}")
        w = w.to(y.dtype) if is_torch else w.astype(np.float64)
        w = w.broadcast_to(lead + (T,)) if is_torch else np.broadcast_to(w, lead + (T,))
    valid = w > 0  # a fresh array, safe to write into
    if anchor:
        valid[..., 0] = True  # the anchor sample is the current position: always known

    # Forward-fill masked samples with the last valid one: idx [..., T] into the time axis.
    steps = lib.arange(T, device=y.device) if is_torch else np.arange(T)
    last = lib.where(valid, steps, 0)
    if is_torch:
        idx = torch.cummax(last, dim=-1).values
        y_hold = torch.gather(y, -2, idx[..., None].expand(lead + (T, y.shape[-1])))
        target = torch.where(valid[..., None], y, y_hold)
        w_eff = torch.where(valid, w, torch.full_like(w, HOLD_WEIGHT))
    else:
        idx = np.maximum.accumulate(last, axis=-1)
        y_hold = np.take_along_axis(y, idx[..., None], axis=-2)
        target = np.where(valid[..., None], y, y_hold)
        w_eff = np.where(valid, w, HOLD_WEIGHT)

    # Normal equations A ctrl = b, A [..., C, C], b [..., C, D].
    D2 = _second_difference(C)
    D1 = np.diff(np.eye(C), axis=0)
    penalty = smoothing * D2.T @ D2 + RIDGE * D1.T @ D1  # [C, C]
    if is_torch:
        penalty = torch.as_tensor(penalty, dtype=y.dtype, device=y.device)
    A = lib.einsum("...t,tc,td->...cd", w_eff / T, B, B) + penalty
    b = lib.einsum("...t,tc,...td->...cd", w_eff / T, B, target)

    if not anchor:
        ctrl = lib.linalg.solve(A, b)
    else:
        # Eliminate ctrl0 = y0 exactly: A_rr ctrl_rest = b_r - A_r0 y0.
        y0 = y[..., :1, :]  # [..., 1, D]
        rest = lib.linalg.solve(A[..., 1:, 1:], b[..., 1:, :] - A[..., 1:, :1] @ y0)
        ctrl = torch.cat([y0, rest], -2) if is_torch else np.concatenate([y0, rest], -2)
    return ctrl if is_torch else ctrl.astype(y_dtype)


def evaluate(ctrl: Any, basis: Any) -> Any:
    """ctrl [..., C, D], basis [T, C] -> points [..., T, D] (numpy or torch, like ctrl)."""
    if isinstance(ctrl, Tensor):
        basis = _to_torch(basis, ctrl)
    else:
        ctrl = np.asarray(ctrl)
        basis = np.asarray(basis, dtype=np.result_type(ctrl.dtype, np.float32))
    if basis.ndim != 2 or ctrl.ndim < 2 or basis.shape[1] != ctrl.shape[-2]:
        raise ValueError(
            f"basis [T, C] and ctrl [..., C, D] disagree: {tuple(basis.shape)} vs {tuple(ctrl.shape)}"
        )
    return basis @ ctrl


@functools.lru_cache(maxsize=64)
def _cached_basis(
    kind: str, num_ctrl: int, horizon: int, degree: int, derivative: int
) -> np.ndarray:
    t = np.arange(horizon) / (horizon - 1)
    B = basis_matrix(make_knots(kind, num_ctrl, degree), t, degree, derivative).astype(np.float32)
    B.flags.writeable = False  # shared between callers through the cache
    return B


@dataclass(frozen=True)
class SplineSpec:
    """The trace parameterisation: ``num_ctrl`` control points -> ``horizon`` samples at t_h = h / (H - 1)."""

    kind: str
    num_ctrl: int = NUM_CONTROL_POINTS
    horizon: int = HORIZON
    degree: int = 3

    def __post_init__(self) -> None:
        make_knots(self.kind, self.num_ctrl, self.degree)  # validates kind, counts, degree
        if self.horizon < 2:
            raise ValueError(f"horizon must be >= 2, got {self.horizon}")

    @property
    def knots(self) -> np.ndarray:
        return make_knots(self.kind, self.num_ctrl, self.degree)

    @property
    def times(self) -> np.ndarray:
        """float64[H]: t_h = h / (H - 1)."""
        return np.arange(self.horizon) / (self.horizon - 1)

    def basis(self, derivative: int = 0) -> np.ndarray:
        """Read-only float32[H, C]; derivatives are with respect to t in [0, 1], not steps."""
        return _cached_basis(self.kind, self.num_ctrl, self.horizon, self.degree, derivative)

    def basis_torch(
        self,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        derivative: int = 0,
    ) -> Tensor:
        return torch.tensor(self.basis(derivative), dtype=dtype, device=device)


def measured_continuity(
    knots: Any, degree: int = 3, trials: int = 8, seed: int = 0, eps: float = 1e-9
) -> int:
    """Highest derivative order k such that derivatives 0..k are continuous at every interior knot.

    Measured, not read off the multiplicities: for ``trials`` random control polygons the
    k-th derivative is evaluated at each interior knot ± eps, and a jump larger than 1e-5
    of that derivative's magnitude over the curve counts as a discontinuity. Returns
    ``degree`` when all derivatives up to the degree are continuous (a single polynomial
    piece) and -1 if even the curve itself jumps.
    """
    knots = np.asarray(knots, dtype=np.float64)
    num_ctrl = len(knots) - degree - 1
    interior = np.unique(knots[(knots > knots[0]) & (knots < knots[-1])])
    ctrl = np.random.default_rng(seed).normal(size=(num_ctrl, trials))
    dense = np.linspace(knots[0], knots[-1], 513)
    for k in range(degree + 1):
        scale = np.abs(basis_matrix(knots, dense, degree, k) @ ctrl).max(axis=0)  # [trials]
        before = basis_matrix(knots, interior - eps, degree, k) @ ctrl  # [K, trials]
        after = basis_matrix(knots, interior + eps, degree, k) @ ctrl
        if np.any(np.abs(after - before) > 1e-5 * np.maximum(scale, 1e-12)):
            return k - 1
    return degree
