"""Train an action expert against the frozen μ0 (``mu0 train-expert``).

The traces the expert learns from are the frozen model's predictions on the recorded
observations (``policies.data``, cached), never the ground truth. One process, or many under
``torchrun`` unchanged (DDP, each rank a shard of every batch); bf16 autocast on CUDA.
Writes ``OUT/final`` (the expert checkpoint), ``OUT/metrics.jsonl`` and ``OUT/loss.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mu0_core.pretrain import setup_distributed
from policies.base import ActionExpert, save_expert
from policies.data import build_expert_dataset, lagged_indices, to_tensors
from policies.registry import expert_config


@dataclass(frozen=True)
class ExpertTrainConfig:
    robot: str
    data: tuple[str, ...]
    checkpoint: str  # the frozen μ0
    out_dir: str
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    stride: int = 2
    # Traces reach the loop late (the server's round trip, then a chunk lasts `execute`
    # steps): each sample's traces come from a frame up to this many frames earlier of the
    # same episode, so the expert learns to act on traces a little behind the robot.
    max_trace_lag: int = 4
    # Feed the predicted segment goal to the action head (ActionExpertConfig.goal_input).
    goal_input: bool = True
    seed: int = 0
    device: str = "auto"
    val_share: float = 0.1


def _plot(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [m["step"] for m in metrics if "loss" in m]
    ax.plot(steps, [m["loss"] for m in metrics if "loss" in m], label="train")
    val = [m for m in metrics if "val_loss" in m]
    if val:
        ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def future_limits(
    traces: np.ndarray, trace_steps: list[int], quantile: float = 0.999
) -> list[float]:
    """How far the training traces go from now (m) at each trace step: the ``quantile`` of
    the displacement over every point of every sample, [S, N, T, 3] → one length per step
    (``ActionExpertConfig.future_clip_m``). A high quantile, not the maximum: a handful of
    outliers would otherwise set the limit."""
    steps = np.minimum(np.asarray(trace_steps), traces.shape[2] - 1)
    lengths = []
    for i in range(0, len(traces), 1024):  # in slices: the float16 traces stay small
        tr = traces[i : i + 1024].astype(np.float32)
        d = np.linalg.norm(tr[:, :, steps] - tr[:, :, :1], axis=-1)  # [s, N, S]
        lengths.append(d.reshape(-1, len(steps)))
    q = np.quantile(np.concatenate(lengths), quantile, axis=0)
    return [round(float(x), 5) for x in q]


def split_episodes(
    episode_start: np.ndarray, val_share: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices (validation, training), split by whole episodes: samples of one
    episode are near-duplicates, so a random sample split would measure memory, not how the
    expert does on a scene it has not seen. At least one episode each when there are two."""
    episodes = np.unique(episode_start)
    n_val = int(round(len(episodes) * val_share))
    n_val = min(max(n_val, 1), len(episodes) - 1) if len(episodes) > 1 else 0
    held = rng.choice(episodes, size=n_val, replace=False)
    is_val = np.isin(episode_start, held)
    if not is_val.any():  # one episode: validate on (part of) what it trains on
        return np.arange(len(episode_start)), np.arange(len(episode_start))
    return np.flatnonzero(is_val), np.flatnonzero(~is_val)


@torch.no_grad()
def validation_metrics(expert: ActionExpert, vb: dict, device) -> dict[str, float]:
    """Held-out flow-matching losses with and without traces (the same noise draws) and the
    segment-goal miss: how much the expert gets from the traces on episodes it never saw."""
    flow_only = {k: v for k, v in vb.items() if k not in ("goal", "goal_rot")}
    out = {
        key: float(expert.loss(flow_only, torch.Generator(device).manual_seed(0), traces=use))
        for key, use in (("val_loss", True), ("val_loss_no_trace", False))
    }
    goal = expert.predict_goal(
        vb["traces"], vb["trace_valid"], vb["proprio"][:, :3], vb.get("point_rgb")
    )
    if goal is not None:
        out["val_goal_err_mm"] = round(float((goal - vb["goal"]).norm(dim=-1).mean()) * 1e3, 2)
    return out


def train_expert(cfg: ExpertTrainConfig, progress: bool = True) -> Path:
    info, device = setup_distributed(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from runtime.mu0_adapter import Mu0TraceModel

    mu0 = Mu0TraceModel.from_checkpoint(cfg.checkpoint, device=str(device))
    data = build_expert_dataset(
        [Path(d) for d in cfg.data],
        mu0,
        out / "trace_cache",
        chunk=16,
        stride=cfg.stride,
        progress=progress and info.main,
    )
    del mu0
    instructions = data["instructions"]
    ecfg = expert_config(cfg.robot, instructions)
    ecfg.goal_input = cfg.goal_input
    D = data["proprio"].shape[1]
    if D != ecfg.proprio_dim:
        raise ValueError(
            f"the {cfg.robot} expert expects proprio[{ecfg.proprio_dim}], the data has [{D}]: "
            f"were these recordings made with {cfg.robot}?"
        )
    ecfg.proprio_mean = data["proprio"].mean(0).tolist()
    ecfg.proprio_std = (data["proprio"].std(0) + 1e-3).tolist()
    ecfg.future_clip_m = future_limits(data["traces"], ecfg.trace_steps)
    torch.manual_seed(cfg.seed)
    expert = ActionExpert(ecfg).to(device)
    model = expert
    if info.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(expert)

    S = len(data["proprio"])
    rng = np.random.default_rng(cfg.seed)
    val_idx, train_idx = split_episodes(data["episode_start"], cfg.val_share, rng)
    opt = torch.optim.AdamW(expert.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05
    )
    amp = device.type == "cuda"
    per_rank = max(1, cfg.batch_size // info.world)
    metrics: list[dict] = []
    log = (out / "metrics.jsonl").open("w") if info.main else None
    bar = tqdm(
        range(cfg.steps), desc=f"train {cfg.robot} expert", disable=not (progress and info.main)
    )
    t0 = time.time()
    for step in bar:
        idx = rng.choice(train_idx, size=cfg.batch_size, replace=len(train_idx) < cfg.batch_size)
        idx = idx[info.rank * per_rank : (info.rank + 1) * per_rank]
        trace_idx = lagged_indices(idx, data["episode_start"], cfg.max_trace_lag // cfg.stride, rng)
        batch = to_tensors(data, idx, instructions, device, trace_idx=trace_idx)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = (model.module if info.world > 1 else model).loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(expert.parameters(), 1.0)
        opt.step()
        sched.step()
        if info.main and (step % 50 == 0 or step == cfg.steps - 1):
            m = {"step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0]}
            if step % 500 == 0 or step == cfg.steps - 1:
                expert.eval()
                with torch.no_grad():
                    vb = to_tensors(data, val_idx, instructions, device)
                    m |= validation_metrics(expert, vb, device)
                expert.train()
            metrics.append(m)
            log.write(json.dumps(m) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{m['loss']:.4f}")
    if info.world > 1:
        dist.barrier()
    final = out / "final"
    if info.main:
        log.close()
        save_expert(
            expert.cpu().eval(),
            final,
            extra={
                "trained_on": [str(d) for d in cfg.data],
                "mu0_checkpoint": cfg.checkpoint,
                "samples": int(S),
                "steps": cfg.steps,
                "max_trace_lag": cfg.max_trace_lag,
                "train_seconds": round(time.time() - t0, 1),
                "final_val_loss": metrics[-1].get("val_loss"),
            },
        )
        _plot(metrics, out / "loss.png")
    if info.world > 1:
        dist.destroy_process_group()
    return final
