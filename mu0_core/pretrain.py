"""μ0 pretraining on trace datasets: one process, or many under ``torchrun`` (DDP) unchanged.

- Frozen encoders run once per frame: their features are cached on disk (FeatureCache), so
  training pays only for the fusion and the trace expert. Image augmentations (colour jitter,
  depth noise) change those features, so they turn the cache off (``augment_images``).
- Always-on augmentations that do not touch the frozen features: history masking (points
  with a short or no past) and depth noise on the query points.
- Mixed precision (bf16) on CUDA; float32 on CPU.
- ``out_dir/last`` is a full checkpoint plus the trainer state (optimizer, scheduler, RNG,
  step), written atomically; ``--resume`` continues from it. ``out_dir/final`` is the
  checkpoint to ship. ``metrics.jsonl`` logs every step group; ``loss.png`` plots it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mu0_core.checkpoint import load_checkpoint, save_checkpoint
from mu0_core.config import Mu0Config
from mu0_core.feature_cache import FeatureCache
from mu0_core.types import TraceBatch


@dataclass(frozen=True)
class PretrainConfig:
    out_dir: str
    steps: int = 2000
    batch_size: int = 16
    max_points: int = 32
    # Share of the max_points slots that go first to points that move (training batches only);
    # most extracted points sit still, so random subsets rarely show the model motion.
    moving_share: float = 0.0
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250
    eval_batches: int = 8
    save_every: int = 500
    normalization_batches: int = 32
    cache_features: bool = True
    # Where the cache lives (default OUT/feature_cache); entries are keyed by content and
    # encoder, so runs on the same data and frozen encoders can share one directory.
    feature_cache_dir: str | None = None
    augment_images: bool = False  # colour jitter + depth noise on images (disables the cache)
    hist_mask_prob: float = 0.3  # share of points whose history is cut to a random length
    point_depth_noise_m: float = 0.002
    color_jitter: float = 0.2
    image_depth_noise: float = 0.01  # relative
    amp: bool = True  # bf16 autocast on CUDA only
    device: str = "auto"


# -- distributed helpers -------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> tuple[DistInfo, torch.device]:
    """Reads torchrun's environment; a plain ``python`` run is rank 0 of 1."""
    info = DistInfo()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        info = DistInfo(
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    if info.world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return info, dev


# -- data ----------------------------------------------------------------------------------


def _batches(
    dataset, batch_size: int, seed: int, dist_info: DistInfo, start_step: int = 0
) -> Iterator[list[int]]:
    """Endless shuffled index batches, sharded by rank; epoch e is shuffled with seed + e, so a
    resumed run sees the same order from where it stopped."""
    n = len(dataset)
    if n == 0:
        raise ValueError("pretraining: the training set is empty")
    per_epoch = max(1, n // (batch_size * dist_info.world))
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        order = np.random.default_rng(seed + epoch).permutation(n)
        shard = order[dist_info.rank :: dist_info.world]
        for b in range(per_epoch):
            if skip:
                skip -= 1
                continue
            idx = shard[b * batch_size : (b + 1) * batch_size]
            if len(idx) == 0:
                idx = shard[:batch_size]
            yield [int(i) for i in idx]
        epoch += 1


def _has_depth(item: dict) -> bool:
    d = item.get("depth_m")
    return d is not None and bool(np.isfinite(d).any() and (d > 0).any())


def augment_images(items: list[dict], cfg: PretrainConfig, rng: np.random.Generator) -> list[dict]:
    """Colour jitter (brightness, contrast, saturation) and multiplicative depth noise."""
    out = []
    for it in items:
        it = dict(it)
        rgb = it["rgb"].astype(np.float32) / 255.0
        j = cfg.color_jitter
        rgb = rgb * rng.uniform(1 - j, 1 + j)  # brightness
        mean = rgb.mean()
        rgb = (rgb - mean) * rng.uniform(1 - j, 1 + j) + mean  # contrast
        gray = rgb.mean(-1, keepdims=True)
        rgb = (rgb - gray) * rng.uniform(1 - j, 1 + j) + gray  # saturation
        it["rgb"] = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
        if _has_depth(it):
            d = it["depth_m"]
            it["depth_m"] = (d * (1 + cfg.image_depth_noise * rng.standard_normal(d.shape))).astype(
                np.float32
            )
        out.append(it)
    return out


def augment_queries(
    batch: TraceBatch, cfg: PretrainConfig, generator: torch.Generator
) -> TraceBatch:
    """History masking and depth noise on query points; the frozen features stay valid."""
    B, N, T = batch.hist_valid.shape
    cut = torch.rand(B, N, generator=generator) < cfg.hist_mask_prob
    keep_from = torch.randint(0, T, (B, N), generator=generator)  # keep steps >= keep_from
    steps = torch.arange(T)
    masked = steps[None, None, :] < keep_from[..., None]
    hist_valid = batch.hist_valid & ~(cut[..., None] & masked)
    hist_valid[..., -1] = batch.hist_valid[..., -1]  # the current position is always known
    noise = cfg.point_depth_noise_m * torch.randn(B, N, 1, generator=generator)
    hist = batch.hist_uvz.clone()
    hist[..., 2] = hist[..., 2] + noise  # one offset per point: a biased depth reading
    future = batch.future_uvz.clone()
    future[..., 2] = future[..., 2] + noise
    return dataclasses.replace(batch, hist_uvz=hist, hist_valid=hist_valid, future_uvz=future)


class BatchMaker:
    """Dataset items → TraceBatch with frozen features (cached on disk where allowed)."""

    def __init__(self, model, dataset, cfg: PretrainConfig, cache_dir: Path | None):
        from mu0_core.trace_dataset import collate_traces

        self.collate = collate_traces
        self.model, self.dataset, self.cfg = model, dataset, cfg
        use_cache = cfg.cache_features and not cfg.augment_images and cache_dir is not None
        self.cache = FeatureCache(cache_dir, model.backbone) if use_cache else None

    def __call__(self, indices: list[int], rng: np.random.Generator, train: bool) -> TraceBatch:
        items = [self.dataset[i] for i in indices]
        if train and self.cfg.augment_images:
            items = augment_images(items, self.cfg, rng)
        share = self.cfg.moving_share if train else 0.0
        batch = self.collate(items, max_points=self.cfg.max_points, rng=rng, moving_share=share)
        if self.cache is not None:
            feats = [
                self.cache.encode(
                    it["rgb"], it["depth_m"] if _has_depth(it) else None, it["instruction"]
                )
                for it in items
            ]
            batch.frozen = FeatureCache.collate(_align_depth_keys(feats))
        else:
            with_depth = all(_has_depth(it) for it in items)
            if not with_depth:
                batch.depth_m = None
            batch.frozen = self.model.backbone.encode_frozen(
                batch.rgb, batch.depth_m, batch.instructions
            )
        batch.rgb = None
        batch.depth_m = None
        return batch


def _align_depth_keys(feats: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    # Items with and without depth carry the same keys (depth features are zeros + has_depth).
    keys = set(feats[0])
    for f in feats[1:]:
        if set(f) != keys:
            raise ValueError(f"frozen features disagree in keys: {sorted(keys)} vs {sorted(f)}")
    return feats


# -- trainer state (no pickle: tensors in safetensors, the rest in JSON) -----------------


def save_trainer_state(path: Path, optimizer, scheduler, step: int, extra: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    scalars: dict[str, Any] = {}
    opt = optimizer.state_dict()
    for pid, state in opt["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"opt.{pid}.{k}"] = v
    meta = {
        "step": step,
        "param_groups": opt["param_groups"],
        "scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "extra": extra,
    }
    save_file(tensors, str(path / "trainer_state.safetensors"))
    (path / "trainer_state.json").write_text(json.dumps(meta, indent=1))


def load_trainer_state(path: Path, optimizer, scheduler) -> tuple[int, dict[str, Any]]:
    tensors = load_file(str(path / "trainer_state.safetensors"))
    meta = json.loads((path / "trainer_state.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(meta["step"]), meta.get("extra", {})


# -- the loop ------------------------------------------------------------------------------


def lr_lambda(cfg: PretrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


@torch.no_grad()
def evaluate(
    model, make_batch: BatchMaker, indices: list[list[int]], device, seed: int = 0
) -> dict[str, float]:
    """Validation loss on fixed noise and times, and trace errors of sampled predictions at the
    full horizon (against the simulator's truth where the data has it, else the labels): over
    all points, and over the points that move, beside the static baseline's."""
    from mu0_core.evaluate import Predictor, evaluate_tally

    model.eval()
    losses, batches = [], []
    for k, idx in enumerate(indices):
        batch = make_batch(idx, np.random.default_rng(seed + k), train=False).to(device)
        g = torch.Generator(device=device).manual_seed(seed + k)
        losses.append(model.loss(batch, generator=g)[0].item())
        batches.append(batch)
    means = evaluate_tally(
        [Predictor("mu0", model), Predictor("static", kind="static")],
        lambda: iter(batches),
        seed=seed,
    ).means()
    model.train()
    H = model.cfg.trace.horizon
    nan = float("nan")
    mu0, static = means.get("mu0", {}), means.get("static", {})
    return {
        "val_loss": float(np.mean(losses)),
        "val_ade3d_m": mu0.get(f"ade3d_m_h{H}", nan),
        "val_fde3d_m": mu0.get(f"fde3d_m_h{H}", nan),
        "val_moving_ade3d_m": mu0.get(f"moving_ade3d_m_h{H}", nan),
        "val_moving_fde3d_m": mu0.get(f"moving_fde3d_m_h{H}", nan),
        "val_static_moving_ade3d_m": static.get(f"moving_ade3d_m_h{H}", nan),
    }


def _atomic_checkpoint(
    model, target: Path, extra: dict, optimizer=None, scheduler=None, step: int = 0
) -> None:
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_checkpoint(model, tmp, extra=extra)
    if optimizer is not None:
        save_trainer_state(tmp, optimizer, scheduler, step, extra)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def pretrain(
    model_cfg: Mu0Config, cfg: PretrainConfig, train_set, val_set=None, resume: bool = False
) -> Path:
    """Train μ0; returns ``out_dir/final``. Works as is under torchrun."""
    from mu0_core.model import Mu0

    dist_info, device = setup_distributed(cfg.device)
    out = Path(cfg.out_dir)
    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "pretrain_config.json").write_text(
            json.dumps(
                {"pretrain": dataclasses.asdict(cfg), "model": model_cfg.to_dict()}, indent=2
            )
        )
    torch.manual_seed(cfg.seed + dist_info.rank)

    last = out / "last"
    start_step = 0
    if resume and (last / "trainer_state.json").is_file():
        model, _ = load_checkpoint(last, device)
        model.requires_grad_(True)
        for m in model.backbone.frozen_modules().values():
            m.requires_grad_(False)
    else:
        model = Mu0(model_cfg).to(device)
    cache_dir = Path(cfg.feature_cache_dir) if cfg.feature_cache_dir else out / "feature_cache"
    make_batch = BatchMaker(model, train_set, cfg, cache_dir)
    make_val = BatchMaker(model, val_set, cfg, cache_dir) if val_set is not None else None
    if not (resume and (last / "trainer_state.json").is_file()):
        # Every rank computes the same statistics over the same first batches.
        n = len(train_set)
        norm_idx = [list(range(i, min(n, i + cfg.batch_size))) for i in range(0, n, cfg.batch_size)]
        rng = np.random.default_rng(cfg.seed)
        norm_batches = (
            make_batch(ix, rng, train=False) for ix in norm_idx[: cfg.normalization_batches]
        )
        model.compute_normalization(norm_batches)
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if resume and (last / "trainer_state.json").is_file():
        start_step, _ = load_trainer_state(last, optimizer, scheduler)
        if dist_info.main:
            print(f"resumed from {last} at step {start_step}")

    ddp_model = model
    if dist_info.world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    amp = cfg.amp and device.type == "cuda"
    val_idx = []
    if make_val is not None and len(val_set):
        vn = len(val_set)
        val_idx = [
            list(range(i, min(vn, i + cfg.batch_size))) for i in range(0, vn, cfg.batch_size)
        ]
        val_idx = val_idx[: cfg.eval_batches]

    log_path = out / "metrics.jsonl"
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + dist_info.rank + start_step)
    rng = np.random.default_rng(cfg.seed + 7919 * dist_info.rank + start_step)
    batches = _batches(train_set, cfg.batch_size, cfg.seed, dist_info, start_step)
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        desc="pretrain",
        disable=not dist_info.main,
        dynamic_ncols=True,
    )
    t0, running = time.time(), []
    step = start_step
    while step < cfg.steps:
        batch = augment_queries(make_batch(next(batches), rng, train=True), cfg, generator).to(
            device
        )
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss, stats = ddp_model(batch, generator=None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        running.append({k: float(v) for k, v in stats.items()} | {"grad_norm": float(grad_norm)})
        bar.update(1)
        if dist_info.main and (step % cfg.log_every == 0 or step == cfg.steps):
            row = {k: float(np.mean([r[k] for r in running])) for k in running[0]}
            row |= {
                "step": step,
                "lr": scheduler.get_last_lr()[0],
                "elapsed_s": round(time.time() - t0, 1),
            }
            if (
                make_val is not None
                and val_idx
                and (step % cfg.eval_every == 0 or step == cfg.steps)
            ):
                row |= evaluate(model, make_val, val_idx, device)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(
                loss=f"{row['loss']:.3f}",
                **({"val_ade3d": f"{row['val_ade3d_m']:.4f}"} if "val_ade3d_m" in row else {}),
            )
            running = []
        if dist_info.main and (step % cfg.save_every == 0 or step == cfg.steps):
            _atomic_checkpoint(model, last, {"step": step}, optimizer, scheduler, step)
    bar.close()
    final = out / "final"
    if dist_info.main:
        _atomic_checkpoint(model, final, {"step": step, "pretrain": dataclasses.asdict(cfg)})
        plot_metrics(log_path, out / "loss.png")
    if dist_info.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final


def read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(log_path: Path, png: Path) -> Path | None:
    rows = read_metrics(log_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), dpi=110)
    for key in ("loss", "flow", "done", "rigidity", "val_loss"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            axes[0].plot(*zip(*pts), label=key, marker="o" if key == "val_loss" else None, ms=3)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=8)
    axes[0].set_title("training loss")
    curves = [
        ("val_ade3d_m", "ADE 3D, all points", "o"),
        ("val_fde3d_m", "FDE 3D, all points", "s"),
        ("val_moving_ade3d_m", "ADE 3D, moving points", "^"),
        ("val_moving_fde3d_m", "FDE 3D, moving points", "v"),
        ("val_static_moving_ade3d_m", "static baseline, moving ADE", None),
    ]
    for key, label, marker in curves:
        pts = [(r["step"], 1e3 * r[key]) for r in rows if np.isfinite(r.get(key, np.nan))]
        if pts:
            style = {"marker": marker, "ms": 3} if marker else {"ls": "--", "color": "gray"}
            axes[1].plot(*zip(*pts), label=label, **style)
    axes[1].set_ylabel("mm (H = 32)")
    axes[1].legend(fontsize=7)
    axes[1].set_xlabel("step")
    axes[1].set_title("validation trace error")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
