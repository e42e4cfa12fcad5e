"""Tokenized autoregressive traces: the baseline of VLM methods that write traces as tokens.

Each point's future is cut to K waypoints (every H/K steps), each waypoint's relative
(u, v, z) is quantised into ``bins`` uniform bins per axis over ±``range`` (set from the data's
spread), and a small causal transformer decodes the K·3 tokens one at a time, conditioned on
the point's own token (history, image features) and the backbone's prefix. Greedy decoding at
inference; the trace between waypoints is linear, as drawn from a token sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TokenTraceDecoder(nn.Module):
    def __init__(
        self, width: int, heads: int, layers: int, horizon: int, waypoints: int = 8, bins: int = 256
    ):
        super().__init__()
        if horizon % waypoints:
            raise ValueError(f"horizon {horizon} must be a multiple of waypoints {waypoints}")
        self.horizon, self.waypoints, self.bins = horizon, waypoints, bins
        self.seq_len = waypoints * 3
        self.token_emb = nn.Embedding(bins + 1, width)  # the last id is BOS
        self.pos_emb = nn.Parameter(torch.randn(self.seq_len, width) * 0.02)
        layer = nn.TransformerDecoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, bins)
        steps = torch.arange(1, waypoints + 1) * (horizon // waypoints) - 1  # e.g. 3, 7, ..., 31
        self.register_buffer("waypoint_steps", steps, persistent=False)
        causal = torch.triu(torch.ones(self.seq_len, self.seq_len, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal_mask", causal, persistent=False)

    # tokens <-> values ------------------------------------------------------------------

    def quantise(self, rel: Tensor, scale: Tensor) -> Tensor:
        """rel [..., K, 3] → int64 tokens [..., K*3] (scale [3]: half-range per axis)."""
        x = (rel / scale).clamp(-1.0, 1.0)
        ids = ((x + 1.0) * 0.5 * (self.bins - 1)).round().long()
        return ids.flatten(-2)

    def dequantise(self, ids: Tensor, scale: Tensor) -> Tensor:
        x = ids.float() / (self.bins - 1) * 2.0 - 1.0
        return x.unflatten(-1, (self.waypoints, 3)) * scale

    def waypoints_to_trace(self, wp: Tensor) -> Tensor:
        """wp [B, N, K, 3] at ``waypoint_steps`` → [B, N, H, 3], linear, starting at 0."""
        B, N, K, _ = wp.shape
        knots_t = torch.cat(
            [torch.zeros(1, device=wp.device), self.waypoint_steps.float()]
        )  # [K+1]
        knots_v = torch.cat([torch.zeros_like(wp[:, :, :1]), wp], dim=2)  # [B, N, K+1, 3]
        t = torch.arange(self.horizon, device=wp.device, dtype=torch.float32)
        idx = torch.searchsorted(knots_t, t, right=True).clamp(1, K) - 1  # segment of each step
        t0, t1 = knots_t[idx], knots_t[idx + 1]
        w = ((t - t0) / (t1 - t0)).clamp(0, 1)[None, None, :, None]
        return knots_v[:, :, idx] * (1 - w) + knots_v[:, :, idx + 1] * w

    # network ------------------------------------------------------------------------------

    def _memory(
        self, point_tok: Tensor, prefix: Tensor, prefix_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per point: its own token then the prefix. → ([B*N, 1+P, D], key padding [B*N, 1+P])."""
        B, N, D = point_tok.shape
        P = prefix.shape[1]
        mem = torch.cat([point_tok[:, :, None], prefix[:, None].expand(B, N, P, D)], dim=2)
        pad = torch.cat(
            [
                torch.zeros(B, N, 1, dtype=torch.bool, device=prefix.device),
                ~prefix_mask[:, None].expand(B, N, P),
            ],
            dim=2,
        )
        return mem.reshape(B * N, 1 + P, D), pad.reshape(B * N, 1 + P)

    def logits(self, inputs: Tensor, memory: Tensor, memory_pad: Tensor) -> Tensor:
        """inputs int64 [M, L] (BOS + tokens so far) → logits [M, L, bins]."""
        L = inputs.shape[1]
        x = self.token_emb(inputs) + self.pos_emb[:L]
        x = self.decoder(
            x, memory, tgt_mask=self.causal_mask[:L, :L], memory_key_padding_mask=memory_pad
        )
        return self.head(self.norm(x))

    def loss(
        self, point_tok, prefix, prefix_mask, future_rel, future_valid, weight, scale
    ) -> Tensor:
        """Cross-entropy of the waypoint tokens. future_rel [B, N, H, 3], weight [B, N]."""
        B, N = weight.shape
        wp = future_rel[:, :, self.waypoint_steps]  # [B, N, K, 3]
        wp_valid = future_valid[:, :, self.waypoint_steps]  # [B, N, K]
        targets = self.quantise(wp, scale).reshape(B * N, self.seq_len)
        bos = torch.full((B * N, 1), self.bins, dtype=torch.long, device=targets.device)
        memory, pad = self._memory(point_tok, prefix, prefix_mask)
        logits = self.logits(torch.cat([bos, targets[:, :-1]], dim=1), memory, pad)
        ce = F.cross_entropy(logits.reshape(-1, self.bins), targets.reshape(-1), reduction="none")
        mask = wp_valid.repeat_interleave(3, dim=-1).reshape(-1).float() * weight.reshape(
            -1, 1
        ).expand(-1, self.seq_len).reshape(-1)
        return (ce * mask).sum() / mask.sum().clamp_min(1.0)

    @torch.no_grad()
    def generate(self, point_tok, prefix, prefix_mask, scale) -> Tensor:
        """Greedy decoding → relative trace [B, N, H, 3]."""
        B, N, _ = point_tok.shape
        memory, pad = self._memory(point_tok, prefix, prefix_mask)
        seq = torch.full((B * N, 1), self.bins, dtype=torch.long, device=point_tok.device)
        for _ in range(self.seq_len):
            nxt = self.logits(seq, memory, pad)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        wp = self.dequantise(seq[:, 1:].reshape(B, N, self.seq_len), scale)
        return self.waypoints_to_trace(wp)
