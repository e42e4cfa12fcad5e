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
    D = data["proprio"].shape[1]
    if D != ecfg.proprio_dim:
        raise ValueError(
            f"the {cfg.robot} expert expects proprio[{ecfg.proprio_dim}], the data has [{D}]: "
            f"were these recordings made with {cfg.robot}?"
        )
    ecfg.proprio_mean = data["proprio"].mean(0).tolist()
    ecfg.proprio_std = (data["proprio"].std(0) + 1e-3).tolist()
    torch.manual_seed(cfg.seed)
    expert = ActionExpert(ecfg).to(device)
    model = expert
    if info.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(expert)

    S = len(data["proprio"])
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(S)
    n_val = max(1, int(S * cfg.val_share))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
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
                    m["val_loss"] = float(expert.loss(vb, torch.Generator(device).manual_seed(0)))
                    goal = expert.predict_goal(
                        vb["traces"], vb["trace_valid"], vb["proprio"][:, :3]
                    )
                    if goal is not None:  # how far the segment goal is missed, held-out samples
                        miss = (goal - vb["goal"]).norm(dim=-1).mean()
                        m["val_goal_err_mm"] = round(float(miss) * 1e3, 2)
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
