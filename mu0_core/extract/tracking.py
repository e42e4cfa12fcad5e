"""2D point tracking from pixels: pyramidal Lucas–Kanade with forward–backward checks.

A tracker maps RGB frames uint8[F, H, W, 3] and query pixels float32[N, 2] (in the query
frame) to ``Tracks``: pixel positions float32[F, N, 2] and a visibility flag bool[F, N]
(False = occluded, lost or outside the image). Any object with that ``track`` method plugs
in (a learned tracker such as CoTracker, say): register it under a name with
``register_tracker`` or name it as ``"package.module:factory"``.

Points get lost (occluded, turned away, out of view); ``track_with_reseeding`` keeps the
set topped up by asking, every few frames, for new query points where the live ones are
not. New tracks start at the frame they were seeded at (``Tracks.query_frame``) and are
not visible before it. ``LucasKanadeTracker`` does this in its one forward pass; any other
tracker gets it through repeated ``track`` calls on the rest of the episode (slower).

Lucas–Kanade drifts when it chains frame to frame; each step here is also re-anchored on
the query frame's appearance (LK from the query frame straight to the new frame, started
at the chained estimate) and that anchored estimate wins when it agrees, so rigid parts
that only translate do not accumulate drift.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mu0_core.extract import import_cv2, make_plugin
from mu0_core.extract.keypoints import to_gray

# (frame t, uv_px float32[M, 2] of the points alive at t) -> new query pixels float32[K, 2]
SeedFn = Callable[[int, np.ndarray], np.ndarray]


@dataclass
class Tracks:
    uv_px: np.ndarray  # float32[F, N, 2] pixels; the nearest known position where not visible
    visible: np.ndarray  # bool[F, N]
    query_frame: np.ndarray | None = None  # int64[N] where each track starts; None: one for all


class Tracker(Protocol):
    def track(self, rgb: np.ndarray, query_uv_px: np.ndarray, query_frame: int = 0) -> Tracks: ...


class _Growing:
    """uv float32[F, cap, 2] and visible bool[F, cap] that grow as points join."""

    def __init__(self, F: int):
        self.uv = np.zeros((F, 0, 2), np.float32)
        self.visible = np.zeros((F, 0), bool)
        self.n = 0

    def add(self, k: int) -> np.ndarray:
        F, cap = self.visible.shape
        if self.n + k > cap:
            new_cap = max(2 * cap, self.n + k, 16)
            uv = np.zeros((F, new_cap, 2), np.float32)
            visible = np.zeros((F, new_cap), bool)
            uv[:, :cap], visible[:, :cap] = self.uv, self.visible
            self.uv, self.visible = uv, visible
        idx = np.arange(self.n, self.n + k)
        self.n += k
        return idx


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
    same point (re-seeding starts a new track there instead).
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

    # -- public API ----------------------------------------------------------------------

    def track(self, rgb: np.ndarray, query_uv_px: np.ndarray, query_frame: int = 0) -> Tracks:
        """Follow query pixels of `query_frame` forward and backward through the episode."""
        gray, s = self._prepare(rgb)
        F = len(gray)
        query = np.asarray(query_uv_px, np.float32).reshape(-1, 2)
        out = _Growing(F)
        columns = out.add(len(query))
        for order in (range(query_frame, F), range(query_frame, -1, -1)):
            seed = lambda t, alive: query if t == query_frame else None  # noqa: E731
            self._pass(gray, s, list(order), seed, out, columns)
        qf = np.full(len(query), query_frame, np.int64)
        return Tracks(uv_px=out.uv[:, : out.n], visible=out.visible[:, : out.n], query_frame=qf)

    def track_with_reseeding(self, rgb: np.ndarray, seed: SeedFn, every: int) -> Tracks:
        """One forward pass; `seed(t, alive_uv_px)` gives the query pixels of frame 0 and, every
        `every` frames, new ones to start tracks from (none: an empty array or None)."""
        gray, s = self._prepare(rgb)
        F = len(gray)
        out = _Growing(F)
        query_frame: list[int] = []

        def seed_at(t: int, alive: np.ndarray) -> np.ndarray | None:
            if t % max(1, every) != 0:
                return None
            new = seed(t, alive)
            if new is not None and len(new):
                query_frame.extend([t] * len(new))
            return new

        self._pass(gray, s, list(range(F)), seed_at, out)
        N = out.n
        qf = np.asarray(query_frame, np.int64)
        uv, visible = out.uv[:, :N].copy(), out.visible[:, :N].copy()
        # Before a track starts it has no position: hold its query pixel (not visible).
        before = np.arange(F)[:, None] < qf[None, :]
        uv = np.where(before[..., None], uv[qf, np.arange(N)][None], uv)
        return Tracks(uv_px=uv, visible=visible, query_frame=qf)

    # -- internals -----------------------------------------------------------------------

    def _prepare(self, rgb: np.ndarray) -> tuple[np.ndarray, int]:
        cv2 = import_cv2()
        F, H, W = rgb.shape[:3]
        s = self.upscale or (2 if max(H, W) < 200 else 1)
        gray = to_gray(rgb)
        if s != 1:
            gray = np.stack(
                [cv2.resize(g, (W * s, H * s), interpolation=cv2.INTER_CUBIC) for g in gray]
            )
        return gray, s

    def _patches(self, img: np.ndarray, pts: np.ndarray) -> np.ndarray:
        """float32[M, P*P]: bilinear patches of `img` around upscaled points pts[M, 2]."""
        cv2 = import_cv2()
        P = self.patch_px
        d = np.arange(P, dtype=np.float32) - (P - 1) / 2
        dx, dy = np.meshgrid(d, d)
        map_x = (pts[:, 0:1] + dx.reshape(1, -1)).astype(np.float32)
        map_y = (pts[:, 1:2] + dy.reshape(1, -1)).astype(np.float32)
        out = cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return out.astype(np.float32).reshape(len(pts), P * P)

    def _ncc(self, patch_a: np.ndarray, patch_b: np.ndarray) -> np.ndarray:
        """float[M]: normalised cross-correlation of matching patch rows."""
        a = patch_a - patch_a.mean(1, keepdims=True)
        b = patch_b - patch_b.mean(1, keepdims=True)
        denom = np.sqrt((a * a).sum(1) * (b * b).sum(1))
        # A flat patch has no appearance to contradict the track: let it pass.
        flat = denom < 1e-3 * a.shape[1] * 4
        return np.where(flat, 1.0, (a * b).sum(1) / np.where(flat, 1.0, denom))

    def _pass(
        self,
        gray: np.ndarray,
        s: int,
        order: Sequence[int],
        seed: Callable[[int, np.ndarray], np.ndarray | None],
        out: _Growing,
        columns: np.ndarray | None = None,
    ) -> None:
        """Visit frames in `order`; points join where `seed` gives them and are followed
        from frame to frame until lost. Writes positions and visibility into `out`, in
        new columns or, for a single seeding, in `columns`."""
        cv2 = import_cv2()
        F, Hs, Ws = gray.shape
        H, W = Hs // s, Ws // s
        # Pixel centres: u_up = (u + 0.5) s - 0.5, so the same point maps both ways exactly.
        up = lambda uv: (uv + 0.5) * s - 0.5  # noqa: E731
        down = lambda uv: (uv + 0.5) / s - 0.5  # noqa: E731
        lk = dict(
            winSize=(self.win_size, self.win_size),
            maxLevel=self.max_level,
            criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01),
            minEigThreshold=self.min_eig,
        )
        cols = np.zeros(0, np.int64)  # output column of each point of this pass
        p = np.zeros((0, 1, 2), np.float32)  # current position, upscaled
        alive = np.zeros(0, bool)
        anchor_frame = np.zeros(0, np.int64)
        anchor_pts = np.zeros((0, 1, 2), np.float32)
        anchor_patch = np.zeros((0, self.patch_px**2), np.float32)
        prev = None
        for t in order:
            if prev is not None:
                out.uv[t, : out.n] = out.uv[prev, : out.n]
                idx = np.flatnonzero(alive)
                if len(idx):
                    p0 = p[idx]
                    p1, st, _ = cv2.calcOpticalFlowPyrLK(gray[prev], gray[t], p0, None, **lk)
                    p0b, st_b, _ = cv2.calcOpticalFlowPyrLK(gray[t], gray[prev], p1, None, **lk)
                    fb = np.linalg.norm((p0b - p0).reshape(-1, 2), axis=1) / s
                    ok = (st.ravel() == 1) & (st_b.ravel() == 1) & (fb < self.fb_threshold_px)
                    # Re-anchor on each point's query-frame appearance, from the chained guess.
                    for f in np.unique(anchor_frame[idx]):
                        if f == prev:  # seeded on the previous frame: chaining is anchoring
                            continue
                        g = np.flatnonzero(anchor_frame[idx] == f)
                        pa, st_a, _ = cv2.calcOpticalFlowPyrLK(
                            gray[f],
                            gray[t],
                            anchor_pts[idx[g]],
                            p1[g].copy(),
                            flags=cv2.OPTFLOW_USE_INITIAL_FLOW,
                            **lk,
                        )
                        close = np.linalg.norm((pa - p1[g]).reshape(-1, 2), axis=1) / s
                        use = ok[g] & (st_a.ravel() == 1) & (close < self.anchor_max_px)
                        p1[g[use]] = pa[use]
                    # Appearance check against the query frame: LK beside an occluding edge
                    # can follow the edge while its centre slides over the background; the
                    # small patch at the centre then no longer looks like the point's own.
                    here = self._patches(gray[t], p1.reshape(-1, 2))
                    ok &= self._ncc(anchor_patch[idx], here) >= self.min_ncc
                    q = down(p1.reshape(-1, 2))
                    ok &= (q[:, 0] >= 0) & (q[:, 0] <= W - 1) & (q[:, 1] >= 0) & (q[:, 1] <= H - 1)
                    p[idx[ok]] = p1[ok]
                    out.uv[t, cols[idx[ok]]] = q[ok]
                    out.visible[t, cols[idx[ok]]] = True
                    alive[idx[~ok]] = False
            new = seed(t, out.uv[t, cols[alive]].copy())
            if new is not None and len(new):
                new = np.asarray(new, np.float32).reshape(-1, 2)
                c = columns if columns is not None else out.add(len(new))
                inside = (new[:, 0] >= 0) & (new[:, 0] <= W - 1)
                inside &= (new[:, 1] >= 0) & (new[:, 1] <= H - 1)
                pts = up(new).reshape(-1, 1, 2)
                out.uv[t, c] = new
                out.visible[t, c] = inside
                cols = np.concatenate([cols, c])
                p = np.concatenate([p, pts])
                alive = np.concatenate([alive, inside])
                anchor_frame = np.concatenate([anchor_frame, np.full(len(new), t)])
                anchor_pts = np.concatenate([anchor_pts, pts])
                anchor_patch = np.concatenate(
                    [anchor_patch, self._patches(gray[t], pts.reshape(-1, 2))]
                )
            prev = t


TRACKERS: dict[str, Callable[..., Tracker]] = {"lk": LucasKanadeTracker}


def register_tracker(name: str, factory: Callable[..., Tracker]) -> None:
    """Make ``factory(**kwargs)`` available as ``make_tracker(name)`` (and ``--tracker name``)."""
    if name in TRACKERS:
        raise ValueError(f"tracker {name!r} is already registered")
    TRACKERS[name] = factory


def make_tracker(name: str = "lk", **kwargs: Any) -> Tracker:
    """A tracker by registered name, or by import path ``"package.module:factory"``."""
    return make_plugin("tracker", TRACKERS, name, **kwargs)


def track_with_reseeding(tracker: Tracker, rgb: np.ndarray, seed: SeedFn, every: int) -> Tracks:
    """Tracks seeded at frame 0 and topped up every `every` frames (see the module docstring).

    Uses the tracker's own ``track_with_reseeding`` when it has one; otherwise tracks each
    batch of new points from its frame to the end with ``track`` (forward part only).
    """
    if hasattr(tracker, "track_with_reseeding"):
        return tracker.track_with_reseeding(rgb, seed, every)
    F = len(rgb)
    uv_cols, vis_cols, qf_cols = [], [], []
    for t in range(0, F, max(1, every)):
        if uv_cols:
            uv_t = np.concatenate([u[t] for u in uv_cols])
            vis_t = np.concatenate([v[t] for v in vis_cols])
            alive = uv_t[vis_t]
        else:
            alive = np.zeros((0, 2), np.float32)
        new = seed(t, alive)
        if new is None or len(new) == 0:
            continue
        new = np.asarray(new, np.float32).reshape(-1, 2)
        part = tracker.track(rgb[t:], new, query_frame=0)
        uv = np.repeat(new[None], F, axis=0)
        vis = np.zeros((F, len(new)), bool)
        uv[t:], vis[t:] = part.uv_px, part.visible
        uv_cols.append(uv)
        vis_cols.append(vis)
        qf_cols.append(np.full(len(new), t, np.int64))
    if not uv_cols:
        return Tracks(
            np.zeros((F, 0, 2), np.float32), np.zeros((F, 0), bool), np.zeros(0, np.int64)
        )
    return Tracks(
        uv_px=np.concatenate(uv_cols, 1),
        visible=np.concatenate(vis_cols, 1),
        query_frame=np.concatenate(qf_cols),
    )
