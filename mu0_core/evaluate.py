"""Trace evaluation: μ0 against baselines on the same held-out samples.

Baselines: (a) static — every point stays; (b) constant velocity — the last history velocity
extrapolated; (c) direct regression and (d) tokenized autoregressive traces — trained models
(``train.objective`` "regression" / "tokens") on the same backbone and expert. Every model
sees exactly the same batches (same points, same order); stochastic samplers use fixed seeds.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mu0_core.geometry import uvz_to_xyz
from mu0_core.metrics import mean_dtw_3d, mean_frechet_3d, min_ade_k, smoothness, trace_metrics
from mu0_core.types import TraceBatch

HORIZONS = (8, 16, 32)


def predict_static(batch: TraceBatch, horizon: int) -> torch.Tensor:
    cur = batch.hist_uvz[:, :, -1]  # [B, N, 3]
    return cur[:, :, None].expand(-1, -1, horizon, -1).clone()


def predict_constant_velocity(batch: TraceBatch, horizon: int) -> torch.Tensor:
    """Velocity of the last two valid history steps, per history step, held over the horizon."""
    hist, valid = batch.hist_uvz, batch.hist_valid.bool()
    cur = hist[:, :, -1]
    prev_ok = valid[:, :, -2] & valid[:, :, -1]
    vel = torch.where(prev_ok[..., None], hist[:, :, -1] - hist[:, :, -2], torch.zeros_like(cur))
    steps = torch.arange(horizon, dtype=hist.dtype, device=hist.device)[None, None, :, None]
    return cur[:, :, None] + steps * vel[:, :, None]


class Predictor:
    """A named way to forecast [B, N, H, 3] absolute uvz from a batch with frozen features.
    ``noise_scale`` (flow models) overrides the checkpoint's sampler temperature.

    kind "labels" forecasts the extracted labels themselves (a lost track held where it was
    last seen); `evaluate_tally` scores them against the simulator's truth on the steps where
    they exist: how far from the truth what a model learns from is."""

    def __init__(
        self, name: str, model=None, kind: str = "model", noise_scale: float | None = None
    ):
        self.name, self.model, self.kind = name, model, kind
        self.noise_scale = noise_scale

    def __call__(self, batch: TraceBatch, seed: int) -> torch.Tensor:
        H = batch.future_uvz.shape[2]
        if self.kind == "static":
            return predict_static(batch, H)
        if self.kind == "constant_velocity":
            return predict_constant_velocity(batch, H)
        if self.kind == "labels":
            return hold_last_valid(batch.future_uvz, batch.future_valid)
        g = torch.Generator(device=batch.hist_uvz.device).manual_seed(seed)
        out = self.model.sample_batch(
            batch.frozen,
            batch.hist_uvz,
            batch.hist_valid,
            batch.point_mask,
            batch.intrinsics,
            batch.image_size,
            generator=g,
            noise_scale=self.noise_scale,
        )
        return out["traces_uvz"].float()


def hold_last_valid(traces: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """traces [B, N, H, 3], valid bool[B, N, H] (a valid prefix) -> every step after the
    last valid one holds the last valid position (step 0 is always taken as valid)."""
    valid = valid.bool().clone()
    valid[..., 0] = True
    steps = torch.arange(traces.shape[2], device=traces.device)
    last = torch.where(valid, steps, torch.zeros_like(steps)).cummax(-1).values  # [B, N, H]
    return torch.gather(traces, 2, last[..., None].expand_as(traces))


# A point "moves" when its true position gets this far from where it is now within the horizon.
MOVING_THRESHOLD_M = 0.02
# trace_dataset's gt_part codes (mu0_core.extract.pipeline.body_parts).
PART_CODES = {"scene": 0, "robot": 1, "gripper": 2, "object": 3}


def moving_points(
    batch: TraceBatch,
    threshold_m: float = MOVING_THRESHOLD_M,
    future_uvz: torch.Tensor | None = None,
    future_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """bool [B, N]: real points whose future (the batch's labels unless ``future_uvz`` and
    ``future_valid`` are given, e.g. the simulator's truth) leaves a ``threshold_m`` ball
    around their current position (camera frame) at some valid step. Most points of a
    tabletop scene never move, which flatters a model that predicts stillness; these are
    the others."""
    future_uvz = batch.future_uvz if future_uvz is None else future_uvz
    future_valid = batch.future_valid if future_valid is None else future_valid
    xyz = uvz_to_xyz(future_uvz, batch.intrinsics, batch.image_size)  # [B, N, H, 3]
    cur = uvz_to_xyz(batch.hist_uvz[:, :, -1:], batch.intrinsics, batch.image_size)
    dist = (xyz - cur).norm(dim=-1).masked_fill(~future_valid.bool(), 0.0)
    return (
        batch.point_mask.bool() & batch.hist_valid[:, :, -1].bool() & (dist.amax(-1) > threshold_m)
    )


def _shape_metrics(pred, target, valid, batch: TraceBatch) -> dict[str, float]:
    """DTW (summed distance along the path), discrete Fréchet (3D, m) and smoothness."""
    args = (pred, target, valid, batch.intrinsics, batch.image_size)
    xyz = uvz_to_xyz(pred, batch.intrinsics, batch.image_size)
    return {
        "dtw3d_m": mean_dtw_3d(*args, point_mask=batch.point_mask),
        "frechet3d_m": mean_frechet_3d(*args, point_mask=batch.point_mask),
        "jerk_m": smoothness(xyz)["jerk"],
    }


class Tally:
    """Weighted sums of metrics per model, so results of several datasets (the pairs of a
    split) combine into the same means as one pass over all their batches."""

    def __init__(self):
        self.sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.weights: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        # Per-point values whose median is reported (key + "_median").
        self.values: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))

    def collect(self, name: str, key: str, values) -> None:
        self.values[name][key].extend(float(v) for v in values)

    def add(self, name: str, key: str, value: float, weight: float) -> None:
        if np.isfinite(value) and weight > 0:
            self.sums[name][key] += value * weight
            self.weights[name][key] += weight

    def merge(self, other: Tally) -> Tally:
        for name in other.sums:
            for key, v in other.sums[name].items():
                self.sums[name][key] += v
                self.weights[name][key] += other.weights[name][key]
        for name in other.values:
            for key, vals in other.values[name].items():
                self.values[name][key].extend(vals)
        return self

    def means(self) -> dict[str, dict[str, float]]:
        out = {
            name: {k: v / self.weights[name][k] for k, v in sums.items()}
            for name, sums in self.sums.items()
        }
        for name, per in self.values.items():
            for key, vals in per.items():
                if vals:
                    out.setdefault(name, {})[f"{key}_median"] = float(np.median(vals))
                    out[name][f"{key}_count"] = float(len(vals))
        return out


def _add_scores(
    tally: Tally,
    name: str,
    pred: torch.Tensor,
    batch: TraceBatch,
    target: torch.Tensor,
    valid: torch.Tensor,
    prefix: str,
) -> None:
    """Score ``pred`` against one target (truth or labels) over all points and over the
    points that move in that target; keys get ``prefix`` ("" or "label_")."""
    n_pts = float((valid.any(-1) & batch.point_mask).sum())
    moving = moving_points(batch, future_uvz=target, future_valid=valid)
    tally.add(name, prefix + "moving_share", float(moving.sum()) / max(n_pts, 1.0), n_pts)
    for key, v in _shape_metrics(pred, target, valid, batch).items():
        tally.add(name, prefix + key, v, n_pts)
    subsets = [("", batch.point_mask), ("moving_", moving)]
    if batch.gt_part is not None and not prefix:  # by the body each point lies on (truth)
        for part in ("gripper", "object"):
            subsets.append((f"{part}_moving_", moving & (batch.gt_part == PART_CODES[part])))
    for sub, mask in subsets:
        if sub and not bool(mask.any()):
            continue
        per = trace_metrics(
            pred, target, valid, batch.intrinsics, batch.image_size, HORIZONS, point_mask=mask
        )
        for key, v in per.items():
            if key.startswith("num_points"):
                continue
            w = per.get(f"num_points_h{key.rsplit('_h', 1)[-1]}", n_pts) if "_h" in key else n_pts
            tally.add(name, prefix + sub + key, v, float(w))


def _end_displacements(
    tally: Tally, name: str, pred: torch.Tensor, batch: TraceBatch, target, valid
) -> None:
    """Forecast and true 3D displacement (m) from now to the horizon's last true step, per
    moving gripper point: how far the forecast carries the gripper against how far it goes."""
    moving = moving_points(batch, future_uvz=target, future_valid=valid)
    grip = moving & (batch.gt_part == PART_CODES["gripper"])
    if not bool(grip.any()):
        return
    H = target.shape[2]
    last = torch.where(valid.bool(), torch.arange(H), torch.zeros(H, dtype=torch.long))
    last = last.amax(-1)  # [B, N]
    idx = last[..., None, None].expand(-1, -1, 1, 3)
    xyz = lambda x: uvz_to_xyz(x, batch.intrinsics, batch.image_size)  # noqa: E731
    cur = xyz(batch.hist_uvz[:, :, -1])
    pred_end = xyz(torch.gather(pred, 2, idx)[:, :, 0])
    true_end = xyz(torch.gather(target, 2, idx)[:, :, 0])
    tally.collect(name, "gripper_pred_end_disp_m", (pred_end - cur).norm(dim=-1)[grip].tolist())
    tally.collect(name, "gripper_true_end_disp_m", (true_end - cur).norm(dim=-1)[grip].tolist())


def evaluate_tally(
    predictors: list[Predictor],
    make_batches,
    num_samples_k: int = 0,
    seed: int = 0,
) -> Tally:
    """Score every predictor on the same batches. Unprefixed keys are scored against the
    simulator's truth where the batches carry it (``gt_future_uvz``) and against the
    extracted labels otherwise; ``label_*`` keys are always against the labels. "moving_*"
    keys count only the points that move in the target they are scored against."""
    tally = Tally()
    for k, batch in enumerate(tqdm(make_batches(), desc="eval", leave=False)):
        has_truth = batch.gt_future_uvz is not None
        truth = (batch.gt_future_uvz, batch.gt_future_valid) if has_truth else None
        labels = (batch.future_uvz, batch.future_valid)
        for p in predictors:
            if p.kind == "labels" and not has_truth:
                continue  # labels scored against themselves say nothing
            pred = p(batch, seed + k)
            if p.kind == "labels":
                # Where the labels exist: how far what a model learns from is from the truth.
                gt, gt_ok = truth
                _add_scores(tally, p.name, pred, batch, gt, gt_ok & labels[1], prefix="")
                continue
            _add_scores(tally, p.name, pred, batch, *(truth or labels), prefix="")
            _add_scores(tally, p.name, pred, batch, *labels, prefix="label_")
            if has_truth and batch.gt_part is not None:
                _end_displacements(tally, p.name, pred, batch, *truth)
            if num_samples_k > 1 and p.kind == "model" and p.model.objective == "flow":
                preds = torch.stack(
                    [p(batch, seed + 1000 * (j + 1) + k) for j in range(num_samples_k)]
                )
                target, valid = truth or labels
                n_pts = float((valid.any(-1) & batch.point_mask).sum())
                value = min_ade_k(
                    preds,
                    target,
                    valid,
                    batch.intrinsics,
                    batch.image_size,
                    point_mask=batch.point_mask,
                )
                tally.add(p.name, f"min_ade3d_m_k{num_samples_k}", value, n_pts)
            tally.add(p.name, "scored_against_truth", float(has_truth), 1.0)
    return tally


def evaluate(
    predictors: list[Predictor],
    make_batches,
    num_samples_k: int = 0,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``evaluate_tally``'s means: every metric averaged over all batches, weighted by the
    number of valid points."""
    return evaluate_tally(predictors, make_batches, num_samples_k, seed).means()


TABLE_COLUMNS = [
    ("ade3d_m_h8", "ADE3D@8 mm", 1e3),
    ("ade3d_m_h16", "ADE3D@16 mm", 1e3),
    ("ade3d_m_h32", "ADE3D@32 mm", 1e3),
    ("fde3d_m_h32", "FDE3D@32 mm", 1e3),
    ("ade_px_h32", "ADE px@32", 1.0),
    ("ade_depth_m_h32", "ADE depth@32 mm", 1e3),
    ("moving_share", "moving pts %", 100.0),
    ("moving_ade3d_m_h32", "moving ADE3D@32 mm", 1e3),
    ("moving_fde3d_m_h32", "moving FDE3D@32 mm", 1e3),
    ("gripper_moving_ade3d_m_h32", "gripper moving ADE3D@32 mm", 1e3),
    ("object_moving_ade3d_m_h32", "object moving ADE3D@32 mm", 1e3),
    ("gripper_pred_end_disp_m_median", "gripper end disp. median mm", 1e3),
    ("gripper_true_end_disp_m_median", "true: mm", 1e3),
    ("label_moving_ade3d_m_h32", "vs labels: moving ADE3D@32 mm", 1e3),
]


def markdown_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    header = "| model | " + " | ".join(c[1] for c in TABLE_COLUMNS) + " |"
    lines = ([f"**{title}**", ""] if title else []) + [
        header,
        "|" + "---|" * (len(TABLE_COLUMNS) + 1),
    ]
    for name, m in results.items():
        cells = [f"{m[k] * s:.1f}" if k in m else "–" for k, _, s in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_examples(
    predictors: list[Predictor],
    batch_items: list[dict[str, Any]],
    batch: TraceBatch,
    out_dir: Path,
    seed: int = 0,
) -> list[Path]:
    """Per example: predicted (each model) and true traces over the image, and a 3D plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mu0_core.geometry import uv_to_pixels

    out_dir.mkdir(parents=True, exist_ok=True)
    preds = {p.name: p(batch, seed) for p in predictors}
    # The simulator's truth where the data has it, else the extracted labels.
    if batch.gt_future_uvz is not None:
        truth, truth_valid = batch.gt_future_uvz, batch.gt_future_valid
    else:
        truth, truth_valid = batch.future_uvz, batch.future_valid
    paths = []
    for b, item in enumerate(batch_items):
        W, H = int(batch.image_size[b, 0]), int(batch.image_size[b, 1])
        mask = (batch.point_mask[b] & truth_valid[b].any(-1)).numpy()
        fig = plt.figure(figsize=(4 * (len(preds) + 1), 4.2), dpi=100)
        gt_px = uv_to_pixels(truth[b, mask, :, :2].numpy(), W, H)
        for j, (name, pred) in enumerate(preds.items()):
            ax = fig.add_subplot(1, len(preds) + 1, j + 1)
            ax.imshow(item["rgb"])
            px = uv_to_pixels(pred[b, mask, :, :2].numpy(), W, H)
            for n in range(px.shape[0]):
                ax.plot(gt_px[n, :, 0], gt_px[n, :, 1], "-", color="lime", lw=1, alpha=0.8)
                ax.plot(px[n, :, 0], px[n, :, 1], "-", color="magenta", lw=1.2)
            ax.set_title(f"{name} (magenta) vs truth (green)", fontsize=8)
            ax.set_axis_off()
        ax3 = fig.add_subplot(1, len(preds) + 1, len(preds) + 1, projection="3d")
        gt_xyz = uvz_to_xyz(
            truth[b : b + 1], batch.intrinsics[b : b + 1], batch.image_size[b : b + 1]
        )[0]
        for n in np.nonzero(mask)[0]:
            ax3.plot(*gt_xyz[n].numpy().T, color="green", lw=1)
        for name, pred in preds.items():
            if name.startswith("mu0"):
                xyz = uvz_to_xyz(
                    pred[b : b + 1], batch.intrinsics[b : b + 1], batch.image_size[b : b + 1]
                )[0]
                for n in np.nonzero(mask)[0]:
                    ax3.plot(*xyz[n].numpy().T, color="magenta", lw=1)
        ax3.set_title("3D camera frame (m): μ0 magenta, truth green", fontsize=8)
        fig.suptitle(
            f"{item.get('episode', '')} frame {item.get('frame', '')}: {item['instruction']}",
            fontsize=9,
        )
        fig.tight_layout()
        path = out_dir / f"example_{b:02d}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
