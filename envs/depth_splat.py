"""The compiled loop behind `envs.realsense.DepthToColor` (numba; the `real` extra).

One pass over the depth image: each measured pixel's cell (the patch of surface whose
nearest depth pixel it is) is carried into the colour image, and every colour pixel whose
centre falls inside it takes the depth there, the nearest surface winning. Kept apart so
that importing `envs.realsense` needs no numba.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# A cell is exactly its pixel's square (what rounding to the nearest pixel picks): wider
# would fill colour pixels that belong to a hole. On curved surfaces neighbouring cells,
# each carried over on its own plane, can leave a rare sliver where a colour pixel stays
# 0 (docs/calibration.md).
CELL_HALF = 0.5
# Neighbours within 3 % in 1/z are on the same surface (they give the slopes).
SAME_SURFACE = 0.03


# No zero-division checks (every division is guarded) and fused multiply-adds: about
# 10 % faster. Not the full fastmath: NaN and inf must keep their meaning.
_FAST = {"contract", "arcp", "nsz", "afn"}


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FAST)
def _slope(w: float, before: float, after: float) -> float:
    """d(1/z) per pixel from the neighbours on the same surface (0 where none is)."""
    ok_b = before > 0 and abs(before - w) <= SAME_SURFACE * w
    ok_a = after > 0 and abs(after - w) <= SAME_SURFACE * w
    if ok_b and ok_a:
        return (after - before) / 2
    if ok_a:
        return after - w
    if ok_b:
        return w - before
    return 0.0


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FAST)
def splat_depth(depth, scale, rays_c, du_c, dv_c, t, color_k, max_span, out):
    """Fill out (float32[Hc, Wc], zeroed by the caller) with z in the colour camera.

    depth: [Hd, Wd] in units of ``scale`` metres (the device's uint16, or float32 metres
    with scale 1), 0 = none. rays_c: float32[3, Hd, Wd], R @ (x, y, 1)
    of each depth pixel's ray in the colour frame (R, t: depth -> colour); du_c, dv_c:
    R @ the ray's change per pixel along u and v. color_k: (fx, fy, cx, cy). max_span:
    the widest cell, in colour pixels, that is filled (wider ones, at grazing angles,
    are filled only that far round their centre).
    """
    Hd, Wd = depth.shape
    Hc, Wc = out.shape
    fx, fy, cx, cy = color_k[0], color_k[1], color_k[2], color_k[3]
    tx, ty, tz = t[0], t[1], t[2]
    half_span = 0.5 * max_span
    # Inverse depth with a border of "none" round it.
    inv = np.zeros((Hd + 2, Wd + 2), np.float32)
    for i in range(Hd):
        for j in range(Wd):
            z = depth[i, j]
            if z > 0:
                inv[i + 1, j + 1] = 1.0 / (z * scale)
    for i in range(Hd):
        for j in range(Wd):
            w = inv[i + 1, j + 1]
            if not w > 0:
                continue
            # Inverse depth is linear across the image of a plane: its slopes carry the
            # pixel's measurement to any point of its cell.
            gu = _slope(w, inv[i + 1, j], inv[i + 1, j + 2])
            gv = _slope(w, inv[i, j + 1], inv[i + 2, j + 1])
            # The point times w, in the colour frame: (R ray + t w); z_colour = C / w.
            A = rays_c[0, i, j] + tx * w
            B = rays_c[1, i, j] + ty * w
            C = rays_c[2, i, j] + tz * w
            if not C > 0:
                continue  # behind the colour camera
            iC = 1.0 / C
            a = A * iC
            b = B * iC
            uc = fx * a + cx
            vc = fy * b + cy
            q = w * iC
            # The exact derivatives at the centre (on the pixel's plane) of the colour
            # position and of 1 / z_colour, per depth pixel along u and v.
            dAu, dBu, dCu = du_c[0] + tx * gu, du_c[1] + ty * gu, du_c[2] + tz * gu
            dAv, dBv, dCv = dv_c[0] + tx * gv, dv_c[1] + ty * gv, dv_c[2] + tz * gv
            j00 = fx * iC * (dAu - a * dCu)
            j01 = fx * iC * (dAv - a * dCv)
            j10 = fy * iC * (dBu - b * dCu)
            j11 = fy * iC * (dBv - b * dCv)
            qu = iC * (gu - q * dCu)
            qv = iC * (gv - q * dCv)
            det = j00 * j11 - j01 * j10
            if not det > 1e-9:
                continue  # the colour camera sees this patch edge-on or from behind
            idet = 1.0 / det
            k00, k01, k10, k11 = j11 * idet, -j01 * idet, -j10 * idet, j00 * idet
            hu = min(CELL_HALF * (abs(j00) + abs(j01)), half_span)
            hv = min(CELL_HALF * (abs(j10) + abs(j11)), half_span)
            c0 = max(int(math.ceil(uc - hu)), 0)
            c1 = min(int(math.floor(uc + hu)), Wc - 1)
            r0 = max(int(math.ceil(vc - hv)), 0)
            r1 = min(int(math.floor(vc + hv)), Hc - 1)
            for r in range(r0, r1 + 1):
                dv = r - vc
                for c in range(c0, c1 + 1):
                    du = c - uc
                    # Where this colour pixel's centre lies in the depth pixel's cell.
                    s = k00 * du + k01 * dv
                    e = k10 * du + k11 * dv
                    if abs(s) <= CELL_HALF and abs(e) <= CELL_HALF:
                        qq = q + qu * s + qv * e
                        if qq > out[r, c]:  # out holds 1 / z until the end: nearer wins
                            out[r, c] = qq
    for r in range(Hc):
        for c in range(Wc):
            if out[r, c] > 0:
                out[r, c] = 1.0 / out[r, c]


def warm_up(dtype: type = np.uint16) -> None:
    """Compile (or load the cached build) before the first frame, not during it."""
    depth = np.full((2, 2), 1, dtype)
    rays = np.zeros((3, 2, 2), np.float32)
    rays[2] = 1.0
    unit = np.zeros(3, np.float64)
    out = np.zeros((2, 2), np.float32)
    splat_depth(depth, 1.0, rays, unit, unit, unit, np.ones(4), 4.0, out)
