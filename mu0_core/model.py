"""μ0: backbone (prefix) + trace expert (suffix), trained by flow matching on B-spline control points.

The model contract is small: ``loss(batch)`` for training and ``sample(...)`` for inference.

Targets: each point's future (the next H frames, step 0 = now; see ``mu0_core.extract``)
relative to its current position is fitted with a clamped cubic B-spline of C control points
whose first one is anchored at 0 (the trace starts where the point is). The model generates the C-1 free control
points, normalised per (index, axis) with statistics from the training data.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu0_core import bspline, flow
from mu0_core.backbones.base import Backbone
from mu0_core.config import HFBackboneConfig, Mu0Config, TinyBackboneConfig
from mu0_core.expert import TraceExpert
from mu0_core.geometry import uvz_to_xyz
from mu0_core.types import TraceBatch, TracePrediction, TraceQuery

# Before statistics are computed from data: typical spread of a relative control point
# (normalised uv, metres).
DEFAULT_CTRL_STD = (0.05, 0.05, 0.02)
STD_FLOOR = 1e-3


def build_backbone(cfg: TinyBackboneConfig | HFBackboneConfig) -> Backbone:
    if cfg.kind == "tiny":
        from mu0_core.backbones.tiny import TinyBackbone

        return TinyBackbone(cfg)
    if cfg.kind == "hf":
        from mu0_core.backbones.hf import build_hf_backbone

        return build_hf_backbone(cfg)
    raise ValueError(f"unknown backbone kind {cfg.kind!r}")


class Mu0(nn.Module):
    def __init__(self, cfg: Mu0Config):
        super().__init__()
        self.cfg = cfg
        tc = cfg.trace
        self.backbone = build_backbone(cfg.backbone)
        self.num_free = tc.num_ctrl - 1  # control point 0 is anchored at the current position
        self.expert = TraceExpert(
            cfg.expert,
            prefix_dim=self.backbone.prefix_dim,
            point_feature_dim=self.backbone.point_feature_dim,
            history_steps=tc.history_steps,
            num_ctrl=self.num_free,
            horizon=tc.horizon,
        )
        self.objective = cfg.train.objective
        if self.objective == "tokens":
            from mu0_core.token_decoder import TokenTraceDecoder

            self.token_decoder = TokenTraceDecoder(
                cfg.expert.width, cfg.expert.heads, layers=2, horizon=tc.horizon
            )
        elif self.objective not in ("flow", "regression"):
            raise ValueError(
                f"train.objective must be flow, regression or tokens, got {self.objective!r}"
            )
        self.spline = bspline.SplineSpec(kind=tc.knots, num_ctrl=tc.num_ctrl, horizon=tc.horizon)
        basis = torch.tensor(np.asarray(self.spline.basis(), dtype=np.float32))  # [H, C]
        self.register_buffer("basis", basis, persistent=False)
        # Normalisation statistics live in the checkpoint's JSON, not in the state dict.
        self.register_buffer("ctrl_mean", torch.zeros(self.num_free, 3), persistent=False)
        self.register_buffer(
            "ctrl_std",
            torch.tensor(DEFAULT_CTRL_STD).expand(self.num_free, 3).clone(),
            persistent=False,
        )

    # -- normalisation -------------------------------------------------------------------

    def normalization(self) -> dict[str, list]:
        return {"ctrl_mean": self.ctrl_mean.tolist(), "ctrl_std": self.ctrl_std.tolist()}

    def set_normalization(self, stats: dict[str, list]) -> None:
        mean = torch.as_tensor(stats["ctrl_mean"], dtype=torch.float32)
        std = torch.as_tensor(stats["ctrl_std"], dtype=torch.float32)
        want = (self.num_free, 3)
        if tuple(mean.shape) != want or tuple(std.shape) != want:
            raise ValueError(
                f"normalization: ctrl_mean/ctrl_std must be {list(want)}, "
                f"got {list(mean.shape)} and {list(std.shape)}"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("normalization: statistics must be finite with std > 0")
        self.ctrl_mean.copy_(mean)
        self.ctrl_std.copy_(std)

    @torch.no_grad()
    def compute_normalization(self, batches) -> dict[str, list]:
        """Mean and std of the free control points over an iterable of TraceBatch."""
        chunks = []
        for batch in batches:
            ctrl, weight = self.control_point_targets(batch)
            chunks.append(ctrl[weight > 0].reshape(-1, self.num_free, 3).cpu())
        if not chunks or sum(c.shape[0] for c in chunks) == 0:
            raise ValueError("compute_normalization: no point with a valid future in the data")
        ctrl = torch.cat(chunks)  # [M, C-1, 3]
        std = ctrl.std(dim=0, unbiased=False).clamp_min(STD_FLOOR) if ctrl.shape[0] > 1 else None
        if std is None:
            std = torch.tensor(DEFAULT_CTRL_STD).expand(self.num_free, 3)
        stats = {"ctrl_mean": ctrl.mean(dim=0).tolist(), "ctrl_std": std.tolist()}
        self.set_normalization(stats)
        return stats

    # -- shared pieces -------------------------------------------------------------------

    def count_parameters(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"total": total, "trainable": trainable, "frozen": total - trainable}

    def encode_frozen(self, batch: TraceBatch) -> dict[str, Tensor]:
        if batch.frozen is not None:
            return batch.frozen
        if batch.rgb is None:
            raise ValueError("TraceBatch needs rgb or frozen features")
        return self.backbone.encode_frozen(batch.rgb, batch.depth_m, batch.instructions)

    def _history_features(self, hist_uvz: Tensor, hist_valid: Tensor) -> tuple[Tensor, Tensor]:
        """→ (hist_feat [B, N, T, 4] relative uvz on the expert's scale + valid flag, cur [B, N, 3])."""
        cur = hist_uvz[:, :, -1]  # [B, N, 3]
        rel = (hist_uvz - cur[:, :, None]) / self.ctrl_std[-1]  # [B, N, T, 3]
        valid = hist_valid.bool()
        rel = torch.where(valid[..., None], rel, torch.zeros_like(rel))
        return torch.cat([rel, valid[..., None].float()], dim=-1), cur

    def control_point_targets(self, batch: TraceBatch) -> tuple[Tensor, Tensor]:
        """Fit the relative future: → (free control points [B, N, C-1, 3], weight [B, N])."""
        cur = batch.hist_uvz[:, :, -1]
        rel = batch.future_uvz - cur[:, :, None]  # [B, N, H, 3]
        valid = batch.future_valid.bool()
        rel = torch.where(valid[..., None], rel, torch.zeros_like(rel))
        rel[:, :, 0] = 0.0  # the spline is anchored at the current position
        ctrl = bspline.fit(
            rel,
            self.basis.double(),
            mask=valid,
            smoothing=self.cfg.trace.fit_smoothing,
            anchor=True,
        ).float()  # [B, N, C, 3]
        # A point needs at least two valid future steps (now and one more) to teach anything.
        weight = (batch.point_mask.bool() & (valid[..., 1:].sum(-1) > 0)).float()
        return ctrl[:, :, 1:], weight

    # -- training ------------------------------------------------------------------------

    def forward(
        self, batch: TraceBatch, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict]:
        """The training loss (``forward`` so DistributedDataParallel syncs gradients)."""
        return self.loss(batch, generator)

    def loss(
        self, batch: TraceBatch, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict]:
        tc = self.cfg.train
        B, N = batch.point_mask.shape
        device = batch.hist_uvz.device
        frozen = self.encode_frozen(batch)
        depth_keep = None
        if self.training and tc.depth_dropout > 0:
            depth_keep = torch.rand(B, device=device, generator=generator) >= tc.depth_dropout
        prefix = self.backbone(frozen, depth_keep=depth_keep)
        hist_feat, cur = self._history_features(batch.hist_uvz, batch.hist_valid)
        ctx = self.expert.encode_context(prefix, hist_feat, cur, batch.point_mask.bool())

        ctrl, weight = self.control_point_targets(batch)  # [B, N, C-1, 3], [B, N]
        if self.objective == "tokens":
            rel = batch.future_uvz - cur[:, :, None]
            valid_f = batch.future_valid.bool()
            rel = torch.where(valid_f[..., None], rel, torch.zeros_like(rel))
            token_loss = self.token_decoder.loss(
                ctx.point_emb + ctx.hist_emb,
                ctx.context,
                ctx.prefix_mask,
                rel,
                valid_f,
                weight,
                self.token_scale(),
            )
            return token_loss, {"tokens": token_loss.detach(), "loss": token_loss.detach()}
        x1 = (ctrl - self.ctrl_mean) / self.ctrl_std
        if self.objective == "regression":
            # One pass from a fixed input: the expert regresses the control points directly.
            x0 = torch.zeros_like(x1)
            t = torch.zeros(B, device=device)
            x_t, v_target = x0, x1
        else:
            x0 = torch.randn(x1.shape, device=device, generator=generator)
            t = flow.sample_time(
                B, tc.time_beta_a, tc.time_beta_b, device=device, generator=generator
            )
            x_t, v_target = flow.interpolate(x0, x1, t)
        v_pred, done_logits = self.expert.step(ctx, x_t, t)

        denom = weight.sum().clamp_min(1.0)
        fm = (((v_pred - v_target) ** 2).mean(dim=(-1, -2)) * weight).sum() / denom

        # done[h]: no valid step at or after h (the point's trace has ended).
        valid = batch.future_valid.bool()
        still_valid = valid.flip(-1).cummax(-1).values.flip(-1)  # [B, N, H]
        done_target = (~still_valid).float()
        done_bce = F.binary_cross_entropy_with_logits(done_logits, done_target, reduction="none")
        done = (done_bce.mean(-1) * weight).sum() / denom

        stats = {"flow": fm.detach(), "done": done.detach()}
        total = fm + tc.done_loss_weight * done
        if tc.rigidity_weight > 0 and batch.group_id is not None:
            x1_hat = x_t + (1.0 - t.view(-1, 1, 1, 1)) * v_pred  # the model's estimate of x1
            ctrl_hat = x1_hat * self.ctrl_std + self.ctrl_mean
            rigid = self.rigidity(ctrl_hat, cur, batch, weight_t=t)
            stats["rigidity"] = rigid.detach()
            total = total + tc.rigidity_weight * rigid
        stats["loss"] = total.detach()
        return total, stats

    def token_scale(self) -> Tensor:
        """Half-range of the waypoint tokens per axis: where the data's final control points lie."""
        return self.ctrl_mean[-1].abs() + 3.0 * self.ctrl_std[-1]

    def rigidity(
        self, ctrl_free: Tensor, cur: Tensor, batch: TraceBatch, weight_t: Tensor
    ) -> Tensor:
        """Points of one rigid part keep their pairwise 3D distances over the predicted trace.

        ctrl_free [B, N, C-1, 3] relative; distances are metric (lifted through the intrinsics),
        weighted by flow time t because estimates from very noisy inputs are poor.
        """
        B, N = cur.shape[:2]
        ctrl = torch.cat([torch.zeros_like(ctrl_free[:, :, :1]), ctrl_free], dim=2)  # [B, N, C, 3]
        traj = cur[:, :, None] + torch.einsum("hc,bncd->bnhd", self.basis, ctrl)  # [B, N, H, 3]
        xyz = uvz_to_xyz(traj, batch.intrinsics, batch.image_size)  # [B, N, H, 3]
        dist = torch.cdist(
            xyz.permute(0, 2, 1, 3).flatten(0, 1), xyz.permute(0, 2, 1, 3).flatten(0, 1)
        )
        dist = dist.view(B, -1, N, N)  # [B, H, N, N]
        change = (dist - dist[:, :1]) ** 2  # vs. the distances now
        gid = batch.group_id
        same = (gid[:, :, None] == gid[:, None, :]) & (gid[:, :, None] >= 0)
        same = same & batch.point_mask.bool()[:, :, None] & batch.point_mask.bool()[:, None, :]
        same = same & ~torch.eye(N, dtype=torch.bool, device=gid.device)
        pair_w = same.float() * weight_t.view(B, 1, 1)  # [B, N, N]
        return (change.mean(1) * pair_w).sum() / pair_w.sum().clamp_min(1.0)

    # -- inference -----------------------------------------------------------------------

    def noise_scale(self, override: float | None = None) -> float:
        """The sampler temperature in force: ``override``, else the config's; never negative."""
        scale = self.cfg.train.sample_noise_scale if override is None else float(override)
        if scale < 0:
            raise ValueError(f"noise_scale must be >= 0, got {scale}")
        return scale

    @torch.no_grad()
    def sample_batch(
        self,
        frozen: dict[str, Tensor],
        hist_uvz: Tensor,  # [B, N, T, 3]
        hist_valid: Tensor,  # bool[B, N, T]
        point_mask: Tensor,  # bool[B, N]
        intrinsics: Tensor,  # [B, 4]
        image_size: Tensor,  # [B, 2]
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,  # [B, N, C-1, 3] standard-normal draws
        noise_scale: float | None = None,
    ) -> dict[str, Tensor]:
        """Batched sampler: → dict of ctrl_rel [B,N,C,3], traces_uvz_rel/traces_uvz/
        traces_xyz_cam [B,N,H,3], done bool[B,N,H]. The flow starts from ``noise`` (drawn
        here when None) times ``noise_scale`` (default: the config's ``sample_noise_scale``)."""
        B, N = point_mask.shape
        if not point_mask.any(dim=1).all():
            raise ValueError("every sample needs at least one query point")
        steps = num_steps or self.cfg.train.num_sample_steps
        scale = self.noise_scale(noise_scale)
        prefix = self.backbone(frozen)
        hist_feat, cur = self._history_features(hist_uvz, hist_valid)
        ctx = self.expert.encode_context(prefix, hist_feat, cur, point_mask.bool())
        if self.objective == "tokens":
            rel = self.token_decoder.generate(
                ctx.point_emb + ctx.hist_emb, ctx.context, ctx.prefix_mask, self.token_scale()
            )
            C = self.cfg.trace.num_ctrl
            ctrl = torch.zeros(
                B, N, C, 3, device=rel.device
            )  # waypoints, not a spline: no control points
            done_logits = torch.full(rel.shape[:3], -1.0, device=rel.device)  # no done head
        else:
            if self.objective == "regression":
                zeros = torch.zeros(B, N, self.num_free, 3, device=hist_uvz.device)
                x1, done_logits = self.expert.step(
                    ctx, zeros, torch.zeros(B, device=hist_uvz.device)
                )
            else:
                if noise is None:
                    noise = torch.randn(
                        (B, N, self.num_free, 3), device=hist_uvz.device, generator=generator
                    )
                last_done = []

                def velocity(x: Tensor, t: Tensor) -> Tensor:
                    v, logits = self.expert.step(ctx, x, t)
                    last_done[:] = [logits]
                    return v

                x1 = flow.euler_sample(velocity, noise * scale, steps)
                done_logits = last_done[0]
            ctrl_free = x1 * self.ctrl_std + self.ctrl_mean
            ctrl = torch.cat(
                [torch.zeros_like(ctrl_free[:, :, :1]), ctrl_free], dim=2
            )  # [B, N, C, 3]
            rel = torch.einsum("hc,bncd->bnhd", self.basis, ctrl)  # [B, N, H, 3]
        done = (done_logits > 0).cummax(dim=-1).values  # once done, stays done
        done[..., 0] = False  # "now" is never past the end
        if self.cfg.trace.hold_after_done:  # after the motion ends, hold the last position
            H = rel.shape[2]
            steps_idx = torch.arange(H, device=rel.device).expand(B, N, H)
            last_live = torch.where(done, torch.zeros_like(steps_idx), steps_idx)
            last_live = last_live.cummax(-1).values
            rel = torch.gather(rel, 2, last_live[..., None].expand(B, N, H, 3))
        traces = cur[:, :, None] + rel
        xyz = uvz_to_xyz(traces, intrinsics, image_size)
        return {
            "ctrl_rel": ctrl,
            "traces_uvz_rel": rel,
            "traces_uvz": traces,
            "traces_xyz_cam": xyz,
            "done": done,
        }

    @torch.no_grad()
    def sample(
        self,
        query: TraceQuery,
        num_steps: int | None = None,
        seed: int = 0,
        noise: Tensor | None = None,
        noise_scale: float | None = None,
    ) -> TracePrediction:
        """Forecast traces for one observation. Seeded: the same seed gives the same traces."""
        device = self.basis.device
        t0 = time.perf_counter()
        rgb = torch.as_tensor(np.asarray(query.rgb))
        if rgb.dtype != torch.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise ValueError(f"rgb must be uint8[H, W, 3], got {rgb.dtype} {tuple(rgb.shape)}")
        Hh, Ww = rgb.shape[:2]
        depth = None
        if query.depth_m is not None:
            depth = torch.as_tensor(np.asarray(query.depth_m, dtype=np.float32))[None]
        hist = torch.as_tensor(np.asarray(query.hist_uvz, dtype=np.float32))
        T = self.cfg.trace.history_steps
        if hist.ndim != 3 or hist.shape[1:] != (T, 3) or hist.shape[0] < 1:
            raise ValueError(f"hist_uvz must be float32[N>=1, {T}, 3], got {tuple(hist.shape)}")
        if query.hist_valid is None:
            valid = torch.ones(hist.shape[:2], dtype=torch.bool)
        else:
            valid = torch.as_tensor(np.asarray(query.hist_valid, dtype=bool))
        frozen = self.backbone.encode_frozen(rgb[None], depth, [query.instruction])
        t1 = time.perf_counter()
        generator = torch.Generator(device=device).manual_seed(seed)
        out = self.sample_batch(
            frozen,
            hist[None].to(device),
            valid[None].to(device),
            torch.ones(1, hist.shape[0], dtype=torch.bool, device=device),
            torch.tensor([query.intrinsics], dtype=torch.float32, device=device),
            torch.tensor([[Ww, Hh]], dtype=torch.float32, device=device),
            num_steps=num_steps,
            generator=generator,
            noise=None if noise is None else noise[None].to(device),
            noise_scale=noise_scale,
        )
        t2 = time.perf_counter()
        return TracePrediction(
            ctrl_rel=out["ctrl_rel"][0].cpu(),
            traces_uvz_rel=out["traces_uvz_rel"][0].cpu(),
            traces_uvz=out["traces_uvz"][0].cpu(),
            done=out["done"][0].cpu(),
            traces_xyz_cam=out["traces_xyz_cam"][0].cpu(),
            timings_ms={"encode_frozen": 1e3 * (t1 - t0), "sample": 1e3 * (t2 - t1)},
        )
