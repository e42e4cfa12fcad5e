"""2D point tracking from pixels: pyramidal Lucas–Kanade with forward–backward checks.

A tracker maps RGB frames uint8[F, H, W, 3] and query pixels float32[N, 2] (in the query
frame) to ``Tracks``: pixel positions float32[F, N, 2] and a visibility flag bool[F, N]
(False = occluded, lost or outside the image). Any object with that ``track`` method plugs
in (a learned tracker such as CoTracker, say): register it under a name with
``register_tracker`` or name it as ``"package.module:factory"``.

Lucas–Kanade drifts when it chains frame to frame; each step here is also re-anchored on
the query frame's appearance (LK from the query frame straight to the new frame, started
at the chained estimate) and that anchored estimate wins when it agrees, so rigid parts
that only translate do not accumulate drift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mu0_core.extract import import_cv2, make_plugin
from mu0_core.extract.keypoints import to_gray


@dataclass
class Tracks:
    uv_px: np.ndarray  # float32[F, N, 2] pixels; the last known position where not visible
    visible: np.ndarray  # bool[F, N]


class Tracker(Protocol):
    def track(self, rgb: np.ndarray, query_uv_px: np.ndarray, query_frame: int = 0) -> Tracks: ...


class LucasKanadeTracker:
    """Pyramidal LK (OpenCV), forward–backward checked, anchored on the query frame.

    win_size: LK window in pixels of the (upscaled) image; max_level: pyramid levels;
    fb_threshold_px: a point whose backward track misses its start by more than this
    (original pixels) is lost; upscale: track on images enlarged by this factor (None:
    2 for images under 200 px, where sub-pixel precision matters most); anchor_max_px:
    the anchored estimate replaces the chained one when they are this close; min_ncc:
    a point whose small patch (patch_px, in upscaled pixels) correlates less than this with
    its patch in the query frame is lost.
    A lost point stays lost: what LK finds after an occlusion is not trusted to be the
    same point.
    """

    def __init__(
        self,
        win_size: int = 15,
        max_level: int = 3,
        fb_threshold_px: float = 0.5,
        upscale: int | None = None,
        anchor_max_px: float = 1.5,
        min_eig: float = 1e-5,
        min_ncc: float = 0.6,
        patch_px: int = 7,
    ):
        self.min_ncc, self.patch_px = min_ncc, patch_px
        self.win_size, self.max_level = win_size, max_level
        self.fb_threshold_px, self.upscale = fb_threshold_px, upscale
        self.anchor_max_px, self.min_eig = anchor_max_px, min_eig

    def _ncc(
        self, img_a: np.ndarray, pts_a: np.ndarray, img_b: np.ndarray, pts_b: np.ndarray
    ) -> np.ndarray:
        """float[M]: normalised cross-correlation of small patches around matching points."""
        cv2 = import_cv2()
        size = (self.patch_px, self.patch_px)
        out = np.empty(len(pts_a))
        for i, (a, b) in enumerate(zip(pts_a.reshape(-1, 2), pts_b.reshape(-1, 2))):
            pa = cv2.getRectSubPix(img_a, size, (float(a[0]), float(a[1]))).astype(np.float32)
            pb = cv2.getRectSubPix(img_b, size, (float(b[0]), float(b[1]))).astype(np.float32)
            pa, pb = pa - pa.mean(), pb - pb.mean()
            denom = np.sqrt((pa * pa).sum() * (pb * pb).sum())
            # A flat patch has no appearance to contradict the track: let it pass.
            out[i] = 1.0 if denom < 1e-3 * pa.size * 4 else float((pa * pb).sum() / denom)
        return out

    def track(self, rgb: np.ndarray, query_uv_px: np.ndarray, query_frame: int = 0) -> Tracks:
        cv2 = import_cv2()
        F, H, W = rgb.shape[:3]
        N = len(query_uv_px)
        s = self.upscale or (2 if max(H, W) < 200 else 1)
        gray = to_gray(rgb)
        if s != 1:
            gray = np.stack(
                [cv2.resize(g, (W * s, H * s), interpolation=cv2.INTER_CUBIC) for g in gray]
            )
        # Pixel centres: u_up = (u + 0.5) s - 0.5, so the same point maps both ways exactly.
        up = lambda uv: (uv + 0.5) * s - 0.5  # noqa: E731
        down = lambda uv: (uv + 0.5) / s - 0.5  # noqa: E731
        lk = dict(
            winSize=(self.win_size, self.win_size),
            maxLevel=self.max_level,
            criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01),
            minEigThreshold=self.min_eig,
        )

        uv = np.zeros((F, N, 2), np.float32)
        visible = np.zeros((F, N), bool)
        uv[query_frame] = query_uv_px
        inside = (query_uv_px[:, 0] >= 0) & (query_uv_px[:, 0] <= W - 1)
        inside &= (query_uv_px[:, 1] >= 0) & (query_uv_px[:, 1] <= H - 1)
        visible[query_frame] = inside
        anchor_img = gray[query_frame]
        anchor_pts = up(query_uv_px.astype(np.float32)).reshape(-1, 1, 2)
        for direction in (1, -1):
            alive = visible[query_frame].copy()
            p = anchor_pts.copy()
            t = query_frame
            while 0 <= t + direction < F:
                t_next = t + direction
                uv[t_next] = uv[t]
                idx = np.flatnonzero(alive)
                if len(idx) == 0:
                    t = t_next
                    continue
                prev, nxt = gray[t], gray[t_next]
                p0 = p[idx]
                p1, st, _ = cv2.calcOpticalFlowPyrLK(prev, nxt, p0, None, **lk)
                p0b, st_b, _ = cv2.calcOpticalFlowPyrLK(nxt, prev, p1, None, **lk)
                fb = np.linalg.norm((p0b - p0).reshape(-1, 2), axis=1) / s
                ok = (st.ravel() == 1) & (st_b.ravel() == 1) & (fb < self.fb_threshold_px)
                # Re-anchor on the query frame's appearance, starting from the chained guess.
                pa, st_a, _ = cv2.calcOpticalFlowPyrLK(
                    anchor_img,
                    nxt,
                    anchor_pts[idx],
                    p1.copy(),
                    flags=cv2.OPTFLOW_USE_INITIAL_FLOW,
                    **lk,
                )
                close = np.linalg.norm((pa - p1).reshape(-1, 2), axis=1) / s < self.anchor_max_px
                use_anchor = ok & (st_a.ravel() == 1) & close
                p1[use_anchor] = pa[use_anchor]
                # Appearance check against the query frame: LK beside an occluding edge can
                # follow the edge while its centre slides over the background; the small
                # patch at the centre then no longer looks like the point's own.
                ok &= self._ncc(anchor_img, anchor_pts[idx], nxt, p1) >= self.min_ncc
                q = down(p1.reshape(-1, 2))
                ok &= (q[:, 0] >= 0) & (q[:, 0] <= W - 1) & (q[:, 1] >= 0) & (q[:, 1] <= H - 1)
                p[idx[ok]] = p1[ok]
                uv[t_next, idx[ok]] = q[ok]
                visible[t_next, idx[ok]] = True
                alive[idx[~ok]] = False
                t = t_next
        return Tracks(uv_px=uv, visible=visible)


TRACKERS: dict[str, Callable[..., Tracker]] = {"lk": LucasKanadeTracker}


def register_tracker(name: str, factory: Callable[..., Tracker]) -> None:
    """Make ``factory(**kwargs)`` available as ``make_tracker(name)`` (and ``--tracker name``)."""
    if name in TRACKERS:
        raise ValueError(f"tracker {name!r} is already registered")
    TRACKERS[name] = factory


def make_tracker(name: str = "lk", **kwargs: Any) -> Tracker:
    """A tracker by registered name, or by import path ``"package.module:factory"``."""
    return make_plugin("tracker", TRACKERS, name, **kwargs)
