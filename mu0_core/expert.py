"""The trace expert (suffix): forecasts B-spline control points for a set of query points.

Each query point becomes two tokens:
- a history token: its past (8 steps, relative to its current position, with validity),
  Fourier features of its current (u, v), its depth, and image features sampled at its pixel;
- a future token: its noisy control points x_t (flow matching) plus the same point embedding.
Tokens attend to each other (no positional order among points, so permuting the queries
permutes the outputs and nothing else) and cross-attend to the backbone's prefix. Flow time
enters every block through adaLN-Zero. The future token gives the velocity; the history
token gives a per-step "done" logit (the point's motion has ended by that step).

The prefix side (its projection and every layer's cross-attention keys and values) and the
point embeddings do not depend on x_t or t: ``encode_context`` computes them once, and each
Euler step only runs ``step``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu0_core.backbones.base import Prefix
from mu0_core.config import ExpertConfig


def fourier_features(uv: Tensor, bands: int) -> Tensor:
    """uv: [..., 2] in [-1, 1] → [..., 4 * bands] (sin, cos of 2^k π u and 2^k π v)."""
    freqs = (2.0 ** torch.arange(bands, device=uv.device, dtype=uv.dtype)) * math.pi  # [F]
    angles = uv[..., None] * freqs  # [..., 2, F]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """t: [B] in [0, 1] → sinusoidal [B, dim] (t scaled by 1000 as in diffusion models)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def sample_at_points(feature_map: Tensor, uv: Tensor) -> Tensor:
    """Bilinear features at normalised uv. feature_map [B, C, h, w], uv [B, N, 2] → [B, N, C]."""
    grid = uv[:, :, None, :]  # [B, N, 1, 2]
    out = F.grid_sample(
        feature_map, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out[..., 0].transpose(1, 2)  # [B, N, C]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value inputs and a key mask."""

    def __init__(self, width: int, heads: int, kv_width: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(kv_width or width, 2 * width)
        self.out = nn.Linear(width, width)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        B, P, _ = context.shape
        k, v = self.kv(context).view(B, P, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return k, v  # each [B, heads, P, head_dim]

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], key_mask: Tensor) -> Tensor:
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.heads, -1).transpose(1, 2)  # [B, heads, T, head_dim]
        k, v = kv
        attn_mask = key_mask[:, None, None, :]  # [B, 1, 1, P]; True = attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class ExpertBlock(nn.Module):
    """Self-attention among point tokens, cross-attention to the prefix, MLP; adaLN-Zero."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.self_attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.cross_attn = Attention(width, heads)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        # adaLN-Zero: shift, scale, gate for each of the three sub-layers, zero-initialised so
        # every block starts as the identity.
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 9 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(
        self, x: Tensor, cond: Tensor, token_mask: Tensor, prefix_kv, prefix_mask
    ) -> Tensor:
        s1, c1, g1, s2, c2, g2, s3, c3, g3 = self.ada(cond).chunk(9, dim=-1)  # each [B, D]
        h = modulate(self.norm1(x), s1, c1)
        x = x + g1[:, None] * self.self_attn(h, self.self_attn.project_kv(h), token_mask)
        h = modulate(self.norm2(x), s2, c2)
        x = x + g2[:, None] * self.cross_attn(h, prefix_kv, prefix_mask)
        h = modulate(self.norm3(x), s3, c3)
        return x + g3[:, None] * self.mlp(h)


@dataclass
class ExpertContext:
    """What the Euler steps share: computed once per observation."""

    point_emb: Tensor  # [B, N, D]
    hist_emb: Tensor  # [B, N, D]
    token_mask: Tensor  # bool[B, 2N]
    prefix_kv: list[tuple[Tensor, Tensor]]  # per layer
    prefix_mask: Tensor  # bool[B, P]
    context: Tensor  # [B, P, D] the prefix projected to the expert's width


class TraceExpert(nn.Module):
    def __init__(
        self,
        cfg: ExpertConfig,
        prefix_dim: int,
        point_feature_dim: int,
        history_steps: int,
        num_ctrl: int,
        horizon: int,
    ):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.num_ctrl, self.horizon = num_ctrl, horizon
        fourier_dim = 4 * cfg.fourier_bands
        self.prefix_proj = nn.Linear(prefix_dim, D)
        self.point_feat_proj = nn.Sequential(
            nn.LayerNorm(point_feature_dim), nn.Linear(point_feature_dim, D)
        )
        self.point_geom = nn.Sequential(nn.Linear(fourier_dim + 1, D), nn.GELU(), nn.Linear(D, D))
        self.hist_mlp = nn.Sequential(nn.Linear(history_steps * 4, D), nn.GELU(), nn.Linear(D, D))
        self.future_mlp = nn.Sequential(nn.Linear(num_ctrl * 3, D), nn.GELU(), nn.Linear(D, D))
        self.type_emb = nn.Parameter(torch.randn(2, D) * 0.02)  # history, future
        self.time_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(
            ExpertBlock(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers)
        )
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        nn.init.zeros_(self.final_ada[1].weight)
        nn.init.zeros_(self.final_ada[1].bias)
        self.velocity_head = nn.Linear(D, num_ctrl * 3)
        self.done_head = nn.Linear(D, horizon)
        nn.init.zeros_(self.velocity_head.weight)
        nn.init.zeros_(self.velocity_head.bias)

    def encode_context(
        self,
        prefix: Prefix,
        hist_feat: Tensor,  # [B, N, T_hist, 4]: relative uvz (normalised scale) + valid flag
        cur_uvz: Tensor,  # [B, N, 3] current position (uv normalised, z metres)
        point_mask: Tensor,  # bool[B, N]
    ) -> ExpertContext:
        B, N, _ = cur_uvz.shape
        uv = cur_uvz[..., :2].clamp(-1.0, 1.0)
        sampled = torch.cat(
            [sample_at_points(m, uv) for m in prefix.feature_maps], dim=-1
        )  # [B, N, Cf]
        geom = torch.cat([fourier_features(uv, self.cfg.fourier_bands), cur_uvz[..., 2:3]], dim=-1)
        point_emb = self.point_feat_proj(sampled) + self.point_geom(geom)  # [B, N, D]
        hist_emb = self.hist_mlp(hist_feat.flatten(2))  # [B, N, D]
        context = self.prefix_proj(prefix.tokens)  # [B, P, D]
        prefix_kv = [block.cross_attn.project_kv(context) for block in self.blocks]
        token_mask = torch.cat([point_mask, point_mask], dim=1)  # [B, 2N]
        return ExpertContext(
            point_emb, hist_emb, token_mask, prefix_kv, prefix.mask.bool(), context
        )

    def step(self, ctx: ExpertContext, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """x_t: [B, N, C, 3] noisy normalised control points, t: [B] → (velocity [B, N, C, 3],
        done logits [B, N, H])."""
        B, N, C, _ = x_t.shape
        hist_tok = ctx.point_emb + ctx.hist_emb + self.type_emb[0]  # [B, N, D]
        fut_tok = ctx.point_emb + self.future_mlp(x_t.flatten(2)) + self.type_emb[1]  # [B, N, D]
        x = torch.cat([hist_tok, fut_tok], dim=1)  # [B, 2N, D]
        cond = self.time_mlp(timestep_embedding(t, x.shape[-1]))  # [B, D]
        for block, kv in zip(self.blocks, ctx.prefix_kv):
            x = block(x, cond, ctx.token_mask, kv, ctx.prefix_mask)
        shift, scale = self.final_ada(cond).chunk(2, dim=-1)
        x = modulate(self.final_norm(x), shift, scale)
        velocity = self.velocity_head(x[:, N:]).view(B, N, C, 3)
        done_logits = self.done_head(x[:, :N])  # [B, N, H]
        return velocity, done_logits
