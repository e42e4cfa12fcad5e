"""Pictures of traces: predicted (and optionally true) traces drawn over the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mu0_core.geometry import uv_to_pixels


def draw_traces(
    rgb: np.ndarray,  # uint8[H, W, 3]
    traces_uvz: np.ndarray,  # float[N, T, 3] normalised uv + depth
    path: str | Path,
    hist_uvz: np.ndarray | None = None,  # float[N, T_hist, 3]
    hist_valid: np.ndarray | None = None,  # bool[N, T_hist]; None = all valid
    true_uvz: np.ndarray | None = None,  # float[N, T, 3]
    done: np.ndarray | None = None,  # bool[N, T]
    title: str = "",
) -> Path:
    """Save a PNG: each trace coloured from start (dark) to end (bright), history in white."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    H, W = rgb.shape[:2]
    fig, ax = plt.subplots(figsize=(6, 6 * H / W), dpi=120)
    ax.imshow(rgb)
    pred_px = uv_to_pixels(np.asarray(traces_uvz)[..., :2], W, H)  # [N, T, 2]
    for n in range(pred_px.shape[0]):
        pts = pred_px[n]
        if done is not None:
            live = ~np.asarray(done[n])
            pts = pts[: max(2, int(live.sum()))]
        segments = np.stack([pts[:-1], pts[1:]], axis=1)
        lc = LineCollection(segments, cmap="plasma", linewidths=2)
        lc.set_array(np.linspace(0, 1, len(segments)))
        ax.add_collection(lc)
        ax.plot(*pts[-1], marker="o", ms=3, color="yellow")
    if true_uvz is not None:
        true_px = uv_to_pixels(np.asarray(true_uvz)[..., :2], W, H)
        for n in range(true_px.shape[0]):
            ax.plot(true_px[n, :, 0], true_px[n, :, 1], "--", color="lime", lw=1)
    if hist_uvz is not None:
        hist_px = uv_to_pixels(np.asarray(hist_uvz)[..., :2], W, H)
        for n in range(hist_px.shape[0]):
            seen = np.ones(len(hist_px[n]), bool) if hist_valid is None else hist_valid[n]
            ax.plot(hist_px[n, seen, 0], hist_px[n, seen, 1], "-", color="white", lw=1)
            ax.plot(*hist_px[n, -1], marker="+", ms=6, color="white")
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
