"""The published μ0 as a torch module: the release's architecture, our code.

Reference: github Yoonkyo/mu0 @ 920a03f (``src/lerobot/policies/mu0/``). What it is:

- prefix: SmolVLM2's SigLIP tower over the RGB image and over a turbo-coloured depth image
  (the depth pass swaps in a cloned patch stem and turns on a rank-r LoRA on the tower's
  linears), the pixel-shuffle connector, and the instruction's token embeddings, run through
  the first ``num_vlm_layers`` Llama layers once to fill a key/value cache per layer;
- suffix: per keypoint one history token (8 past steps, anchor-relative) and one future token
  (10 control points of a C0 cubic B-spline, anchor-relative and divided by ``delta_scale``),
  plus learned group/segment embeddings, Fourier features of the keypoint's (u, v) and a
  DINOv2 feature sampled there; a half-width Llama "expert" whose even layers attend jointly
  to the cached prefix and the suffix and whose odd layers cross-attend to a projection of
  that layer's cached VLM keys/values; adaLN-Zero injects the flow time per expert layer;
- a 4-step Euler sampler from t = 1 (noise) to t = 0 (data), velocity = noise - data, and a
  done head (probability that each of the 32 steps is still part of the motion).

All tensors here are in the reference's conventions: uv = 2 u_px / W - 1 (see
``preprocess.py`` for the conversion from ours), traces anchor-relative and scaled.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from mu0_core.bspline import basis_matrix, make_knots
from mu0_core.published.config import PublishedConfig


def expert_intermediate_size(hidden: int, multiplier: int = 4, multiple_of: int = 256) -> int:
    """The reference expert's MLP width: 4 * (2/3) * hidden, rounded up to a multiple of 256."""
    size = int(multiplier * int(2 * hidden / 3))
    return multiple_of * ((size + multiple_of - 1) // multiple_of)


def reference_basis(num_ctrl: int, horizon: int) -> Tensor:
    """float32[H, C]: the reference's C0 cubic (interior knots repeated 3x), at t = (i+1)/H."""
    t = (np.arange(horizon, dtype=np.float64) + 1) / horizon
    return torch.from_numpy(basis_matrix(make_knots("bezier", num_ctrl), t)).float()


def sinusoidal_embedding(t: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """float64[B, dim] sin/cos features of t: the reference computes these in float64 on CPU
    and CUDA, so we do too (float32 would move the time embedding by ~1e-6)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (2 * math.pi / period)[None, :] * t[:, None].to(torch.float64)
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def fourier_uv(uv: Tensor, num_freqs: int) -> Tensor:
    """float[..., 4K]: sin/cos of (u, v) at pi * 2^k, laid out [u: sin K, cos K, v: sin K, cos K]."""
    freqs = (2.0 ** torch.arange(num_freqs, device=uv.device, dtype=uv.dtype)) * math.pi
    angle = uv[..., None] * freqs  # (..., 2, K)
    return torch.cat([angle.sin(), angle.cos()], dim=-1).flatten(-2)


def apply_rope(x: Tensor, positions: Tensor, max_wavelength: float = 10_000.0) -> Tensor:
    """Rotate x[B, L, heads, d] by positions[B, L] (split-halves layout, base 10 000 — the
    reference's own RoPE, not the VLM config's rope_theta)."""
    d_half = x.shape[-1] // 2
    dtype = x.dtype
    x = x.float()
    exponents = (2.0 / x.shape[-1]) * torch.arange(d_half, dtype=torch.float32, device=x.device)
    radians = positions[..., None].float() / (max_wavelength**exponents)[None, None, :]
    radians = radians[..., None, :]  # broadcast over heads
    sin, cos = radians.sin(), radians.cos()
    x1, x2 = x[..., :d_half], x[..., d_half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)


def attention(mask: Tensor, q: Tensor, k: Tensor, v: Tensor, kv_heads: int) -> Tensor:
    """Eager attention in float32: q[B, Lq, H, d], k/v[B, Lk, kv_heads, d], mask bool[B, Lq, Lk]
    -> [B, Lq, H * d]. A fully masked row attends uniformly (as the reference does), which only
    ever happens for padding whose output is discarded."""
    B, Lq, H, d = q.shape
    groups = H // kv_heads
    k = k.repeat_interleave(groups, dim=2) if groups > 1 else k
    v = v.repeat_interleave(groups, dim=2) if groups > 1 else v
    scores = torch.matmul(q.float().transpose(1, 2), k.float().permute(0, 2, 3, 1)) * d**-0.5
    scores = torch.where(mask[:, None], scores, torch.finfo(torch.float32).min)
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.matmul(probs, v.transpose(1, 2))  # (B, H, Lq, d)
    return out.transpose(1, 2).reshape(B, Lq, H * d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class _Attn(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, kv_in: int):
        super().__init__()
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(kv_in, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(kv_in, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """One Llama decoder layer's weights; the stack's forward lives in ``PublishedMu0`` because
    the VLM and expert streams share attention. ``kv_in`` differs from ``dim`` only for the
    expert's cross-attention layers, whose k/v read the VLM's cached keys/values."""

    def __init__(self, dim, hidden, heads, kv_heads, head_dim, eps, kv_in=None):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = _Attn(dim, heads, kv_heads, head_dim, kv_in or dim)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = _MLP(dim, hidden)


class DepthLoRALinear(nn.Module):
    """A frozen linear with a LoRA delta (alpha / r) * B A that is on only for the depth pass."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.scaling = alpha / rank
        self.active = False

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.active:
            y = y + self.lora_B(self.lora_A(x)) * self.scaling
        return y


class SwitchedStem(nn.Module):
    """The tower's patch embedding: the pretrained conv for RGB, a cloned one for depth."""

    def __init__(self, rgb: nn.Conv2d, depth: nn.Conv2d | None):
        super().__init__()
        self.rgb = rgb
        self.depth = depth
        self.use_depth = False

    def forward(self, x: Tensor) -> Tensor:
        return (self.depth if self.use_depth and self.depth is not None else self.rgb)(x)


class PublishedMu0(nn.Module):
    """The release architecture. Build with configs from local dirs, then load weights with
    ``mu0_core.published.release.load_release`` (this class only defines shapes)."""

    def __init__(self, cfg: PublishedConfig, vlm_config, dino_config=None):
        super().__init__()
        from transformers.models.smolvlm.modeling_smolvlm import (
            SmolVLMConnector,
            SmolVLMVisionTransformer,
        )

        self.cfg = cfg
        text = vlm_config.text_config
        self.text_dim = text.hidden_size
        self.heads = text.num_attention_heads
        self.kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // self.heads
        n_vlm = cfg.num_vlm_layers if cfg.num_vlm_layers > 0 else text.num_hidden_layers
        if n_vlm > text.num_hidden_layers:
            raise ValueError(
                f"num_vlm_layers={n_vlm} but the VLM config has {text.num_hidden_layers} layers"
            )
        n_exp = cfg.num_expert_layers if cfg.num_expert_layers > 0 else n_vlm
        if n_vlm % n_exp:
            raise ValueError(
                f"num_vlm_layers={n_vlm} is not a multiple of num_expert_layers={n_exp}"
            )
        if "cross" not in cfg.attention_mode:
            raise ValueError(f"attention_mode={cfg.attention_mode!r}: only cross_attn is ported")
        self.num_vlm_layers, self.num_expert_layers = n_vlm, n_exp
        self.every = n_vlm // n_exp  # expert layer e runs beside VLM layer e * every

        # --- prefix: vision tower (+ depth stem and LoRA), connector, text layers ---
        vision = SmolVLMVisionTransformer(vlm_config.vision_config)
        rgb_stem = vision.embeddings.patch_embedding
        depth_stem = None
        if cfg.use_depth and cfg.depth_clone_stem:
            depth_stem = nn.Conv2d(
                rgb_stem.in_channels,
                rgb_stem.out_channels,
                rgb_stem.kernel_size,
                rgb_stem.stride,
                padding=rgb_stem.padding,
            )
        vision.embeddings.patch_embedding = SwitchedStem(rgb_stem, depth_stem)
        self.lora: list[DepthLoRALinear] = []
        if cfg.use_depth and cfg.depth_lora_rank > 0:
            for layer in vision.encoder.layers:
                for parent in (layer.self_attn, layer.mlp):
                    for name in cfg.depth_lora_targets:
                        base = getattr(parent, name, None)
                        if isinstance(base, nn.Linear):
                            wrapped = DepthLoRALinear(
                                base, cfg.depth_lora_rank, cfg.depth_lora_alpha
                            )
                            setattr(parent, name, wrapped)
                            self.lora.append(wrapped)
        self.vision = vision
        self.connector = SmolVLMConnector(vlm_config)
        self.embed_tokens = nn.Embedding(text.vocab_size, self.text_dim)
        eps = text.rms_norm_eps
        self.vlm_layers = nn.ModuleList(
            LlamaBlock(
                self.text_dim,
                text.intermediate_size,
                self.heads,
                self.kv_heads,
                self.head_dim,
                eps,
            )
            for _ in range(n_vlm)
        )

        # --- suffix: the expert and the trace heads ---
        d = int(self.text_dim * cfg.expert_width_multiplier)
        self.expert_dim = d
        kv_width = self.kv_heads * self.head_dim
        self.cross_layers = set()
        layers = []
        for e in range(n_exp):
            cross = not self._is_self_attn(e * self.every)
            if cross:
                self.cross_layers.add(e)
            layers.append(
                LlamaBlock(
                    d,
                    expert_intermediate_size(d),
                    self.heads,
                    self.kv_heads,
                    self.head_dim,
                    eps,
                    kv_in=kv_width if cross else None,
                )
            )
        self.expert_layers = nn.ModuleList(layers)
        self.expert_norm = RMSNorm(d, eps)

        h, g = cfg.history_len, cfg.trace_group_horizon
        D, g_cp = cfg.trace_bspline_n_ctrl, cfg.trace_bspline_ctrl_per_token
        if h % g or D % g_cp:
            raise ValueError(
                f"history_len {h} / trace_group_horizon {g} and trace_bspline_n_ctrl {D} / "
                f"trace_bspline_ctrl_per_token {g_cp} must divide"
            )
        self.G_hist, self.G_fut = h // g, D // g_cp
        G = self.G_hist + self.G_fut
        self.trace_time_embedding = nn.Embedding(h + cfg.future_len, d)
        self.trace_seg_embedding = nn.Embedding(2, d)
        self.trace_uv_pos_mlp = nn.Sequential(
            nn.Linear(4 * cfg.trace_uv_num_freqs, d), nn.SiLU(), nn.Linear(d, d)
        )
        self.trace_in_proj_history = nn.Linear(3 * g, d)
        self.trace_in_proj_future = nn.Linear(3 * g_cp, d)
        self.trace_out_proj_future = nn.Linear(d, 3 * g_cp)
        self.trace_done_proj_bsp = nn.Linear(d, cfg.future_len) if cfg.trace_done_head else None
        self.trace_timestep_embedder = nn.Sequential(
            nn.Linear(cfg.trace_adaln_freq_embed_size, d), nn.SiLU(), nn.Linear(d, d)
        )
        self.trace_adaln_modulation = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d)) for _ in range(n_exp)
        )
        self.tokens_per_point = G  # history groups + future groups

        self.dino = None
        if cfg.use_dino:
            if dino_config is None:
                raise ValueError("the release uses DINOv2 features: give the DINOv2 config")
            from transformers import Dinov2Model

            # The reference loads DINOv2 in bf16 and runs it there; its features differ from
            # an fp32 run by up to 1e-2 in the traces, so bf16 is part of the model.
            self.dino = Dinov2Model(dino_config).to(torch.bfloat16)
            dd = dino_config.hidden_size
            self.trace_dino_fuse_in = nn.Linear(d + dd, d)
            self.trace_dino_fuse_out = nn.Linear(d, d)
            self.dino_patch = dino_config.patch_size
        self.register_buffer("basis", reference_basis(D, cfg.future_len), persistent=False)
        self.register_buffer(
            "dino_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "dino_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False
        )

    def _is_self_attn(self, vlm_layer: int) -> bool:
        n = self.cfg.self_attn_every_n_layers
        return n > 0 and vlm_layer % n == 0

    # ------------------------------------------------------------------ prefix
    @contextmanager
    def _depth_pass(self):
        stem = self.vision.embeddings.patch_embedding
        stem.use_depth = True
        for m in self.lora:
            m.active = True
        try:
            yield
        finally:
            stem.use_depth = False
            for m in self.lora:
                m.active = False

    def embed_image(self, img: Tensor, depth: bool = False) -> Tensor:
        """img float[B, 3, S, S] in [-1, 1] -> float[B, tokens, text_dim] (scaled by sqrt(dim))."""
        if depth:
            with self._depth_pass():
                hidden = self.vision(pixel_values=img).last_hidden_state
        else:
            hidden = self.vision(pixel_values=img).last_hidden_state
        emb = self.connector(hidden)
        return emb * torch.tensor(emb.shape[-1] ** 0.5, dtype=emb.dtype, device=emb.device)

    def embed_prefix(
        self,
        rgb: Tensor,
        depth_rgb: Tensor | None,
        depth_mask: Tensor | None,
        lang_tokens: Tensor,
        lang_mask: Tensor,
        image_tokens: tuple[list[int], list[int]] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(prefix_embs float[B, L, text_dim], prefix_pad bool[B, L]). Images are in [-1, 1];
        ``depth_mask`` bool[B] drops the depth block for samples without depth (training's
        depth dropout), ``image_tokens`` = (start ids, end ids) when the release wraps images."""
        B = rgb.shape[0]
        embs, pads = [], []
        blocks = [(rgb, torch.ones(B, dtype=torch.bool, device=rgb.device), False)]
        if self.cfg.use_depth:
            if depth_rgb is None:
                depth_rgb = torch.zeros_like(rgb)
                depth_mask = torch.zeros(B, dtype=torch.bool, device=rgb.device)
            blocks.append((depth_rgb, depth_mask, True))
        for img, mask, is_depth in blocks:
            if image_tokens is not None:
                start = self.embed_tokens(torch.tensor(image_tokens[0], device=img.device))
                embs.append(start[None].expand(B, -1, -1))
                pads.append(mask[:, None].expand(B, start.shape[0]))
            emb = self.embed_image(img, depth=is_depth)
            embs.append(emb)
            pads.append(mask[:, None].expand(B, emb.shape[1]))
            if image_tokens is not None:
                end = self.embed_tokens(torch.tensor(image_tokens[1], device=img.device))
                embs.append(end[None].expand(B, -1, -1))
                pads.append(mask[:, None].expand(B, end.shape[0]))
        lang = self.embed_tokens(lang_tokens)
        embs.append(lang * math.sqrt(lang.shape[-1]))
        pads.append(lang_mask)
        embs_t, pads_t = torch.cat(embs, dim=1), torch.cat(pads, dim=1)
        if embs_t.shape[1] < self.cfg.prefix_length:
            extra = self.cfg.prefix_length - embs_t.shape[1]
            embs_t = F.pad(embs_t, (0, 0, 0, extra))
            pads_t = F.pad(pads_t, (0, extra), value=False)
        return embs_t, pads_t

    def fill_cache(self, prefix: Tensor, pad: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Run the VLM layers over the prefix; per layer (roped keys, values) [B, L, kv, d].

        The prefix attends bidirectionally among its real tokens; positions skip padding.
        """
        B, L, _ = prefix.shape
        mask = pad[:, None, :] & pad[:, :, None]
        pos = torch.cumsum(pad.long(), dim=1) - 1
        cache = []
        h = prefix
        for i, layer in enumerate(self.vlm_layers):
            x = layer.input_layernorm(h)
            att = layer.self_attn
            q = att.q_proj(x).view(B, L, -1, self.head_dim)
            k = att.k_proj(x).view(B, L, -1, self.head_dim)
            v = att.v_proj(x).view(B, L, -1, self.head_dim)
            q, k = apply_rope(q, pos), apply_rope(k, pos)
            cache.append((k, v))
            if i == len(self.vlm_layers) - 1:
                break  # the last layer's output feeds nothing: only its keys/values are used
            h = h + att.o_proj(attention(mask, q, k, v, self.kv_heads).to(h.dtype))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return cache

    def dino_features(self, rgb: Tensor, uv_ref: Tensor, point_mask: Tensor) -> Tensor:
        """DINOv2 (bf16) patch features bilinearly sampled at each keypoint: bf16[B, N, D]."""
        x = (rgb + 1.0) * 0.5
        x = (x - self.dino_mean) / self.dino_std
        S = self.cfg.dino_input_size
        x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
        out = self.dino(pixel_values=x.to(torch.bfloat16)).last_hidden_state
        B, _, D = out.shape
        P = S // self.dino_patch
        fmap = out[:, self.cfg.dino_num_prefix_tokens :].transpose(1, 2).reshape(B, D, P, P)
        grid = uv_ref.reshape(B, 1, -1, 2).to(fmap.dtype)
        feat = F.grid_sample(fmap, grid, mode="bilinear", align_corners=False)  # (B, D, 1, N)
        feat = feat.squeeze(-2).transpose(1, 2)
        return feat * point_mask.to(feat.dtype)[..., None]

    # ------------------------------------------------------------------ suffix
    def embed_suffix(
        self,
        hist_rel: Tensor,
        x_future: Tensor,
        uv_ref: Tensor,
        point_mask: Tensor,
        history_mask: Tensor,
        dino_feat: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens float[B, N*G, d], pad bool[B, N*G], attend bool[B, N*G, N*G]).

        Tokens are keypoint-major: (point i, group g) at i*G + g. History tokens attend only to
        history tokens of any point; future tokens attend to everything; padding is masked.
        ``history_mask`` bool[B, N] False hides a point's history token (no usable past).
        """
        B, N, h, _ = hist_rel.shape
        cfg, Gh, Gf = self.cfg, self.G_hist, self.G_fut
        G = Gh + Gf
        dev = hist_rel.device
        xh = self.trace_in_proj_history(hist_rel.reshape(B, N, Gh, -1))
        xf = self.trace_in_proj_future(x_future.reshape(B, N, Gf, -1))
        x = torch.cat([xh, xf], dim=2)  # (B, N, G, d)
        x = x + self.trace_time_embedding(torch.arange(G, device=dev))
        seg = torch.cat(
            [
                torch.zeros(Gh, dtype=torch.long, device=dev),
                torch.ones(Gf, dtype=torch.long, device=dev),
            ]
        )
        x = x + self.trace_seg_embedding(seg)
        pos = self.trace_uv_pos_mlp(fourier_uv(uv_ref, cfg.trace_uv_num_freqs))
        x = x + (pos * point_mask.to(pos.dtype)[..., None])[:, :, None, :]
        if dino_feat is not None:
            dino = dino_feat[:, :, None, :].expand(-1, -1, G, -1).to(x.dtype)
            x = self.trace_dino_fuse_out(F.silu(self.trace_dino_fuse_in(torch.cat([x, dino], -1))))
        tokens = x.reshape(B, N * G, -1)

        token_pad = point_mask[:, :, None].expand(B, N, G).clone()
        token_pad[:, :, :Gh] &= history_mask[:, :, None]
        pad = token_pad.reshape(B, N * G)
        group = torch.arange(N * G, device=dev) % G
        group = torch.where(group < Gh, group, torch.full_like(group, Gh))
        causal = group[None, :] <= group[:, None]  # key group <= query group
        attend = pad[:, None, :] & pad[:, :, None] & causal[None]
        return tokens, pad, attend

    def adaln(self, t: Tensor) -> Tensor:
        """float[B, layers, 6, d]: per expert layer (shift, scale, gate) for attention and MLP."""
        freq = sinusoidal_embedding(
            t, self.cfg.trace_adaln_freq_embed_size, self.cfg.min_period, self.cfg.max_period
        )
        cond = self.trace_timestep_embedder(freq.to(self.trace_timestep_embedder[0].weight.dtype))
        mods = torch.stack([head(cond) for head in self.trace_adaln_modulation], dim=1)
        return mods.reshape(t.shape[0], self.num_expert_layers, 6, -1)

    def expert_forward(
        self,
        tokens: Tensor,
        attend: Tensor,
        prefix_pad: Tensor,
        cache: list[tuple[Tensor, Tensor]],
        mods: Tensor,
    ) -> Tensor:
        """The expert stack over the suffix tokens; returns the final-normed float[B, S, d]."""
        B, S, _ = tokens.shape
        L = prefix_pad.shape[1]
        to_prefix = prefix_pad[:, None, :].expand(B, S, L)
        joint_mask = torch.cat([to_prefix, attend], dim=2)
        # Every suffix token sits at the prefix's real length (the reference pins them so
        # the order of keypoints carries no positional signal).
        pos = prefix_pad.sum(dim=1, keepdim=True).expand(B, S)
        h = tokens
        for e, layer in enumerate(self.expert_layers):
            vlm_i = e * self.every
            k_pre, v_pre = cache[vlm_i]
            m = mods[:, e]  # (B, 6, d)
            att = layer.self_attn
            x = layer.input_layernorm(h)
            x = x * (1 + m[:, 1, None]) + m[:, 0, None]
            q = att.q_proj(x).view(B, S, -1, self.head_dim)
            if e in self.cross_layers:
                # Keys/values are a projection of the VLM layer's cached (roped) ones. The
                # query's rotation is the identity: suffix positions minus their minimum are 0.
                k = att.k_proj(k_pre.flatten(2)).view(B, L, -1, self.head_dim)
                v = att.v_proj(v_pre.flatten(2)).view(B, L, -1, self.head_dim)
                out = attention(to_prefix, q, k, v, self.kv_heads)
            else:
                k = att.k_proj(x).view(B, S, -1, self.head_dim)
                v = att.v_proj(x).view(B, S, -1, self.head_dim)
                q, k = apply_rope(q, pos), apply_rope(k, pos)
                k, v = torch.cat([k_pre, k], dim=1), torch.cat([v_pre, v], dim=1)
                out = attention(joint_mask, q, k, v, self.kv_heads)
            h = h + m[:, 2, None] * att.o_proj(out.to(h.dtype))
            x = layer.post_attention_layernorm(h)
            x = x * (1 + m[:, 4, None]) + m[:, 3, None]
            h = h + m[:, 5, None] * layer.mlp(x)
        return self.expert_norm(h)

    # ------------------------------------------------------------------ sampler
    @torch.no_grad()
    def sample(
        self,
        rgb: Tensor,
        depth_rgb: Tensor | None,
        depth_mask: Tensor | None,
        lang_tokens: Tensor,
        lang_mask: Tensor,
        current_kp: Tensor,
        traj_history: Tensor,
        point_mask: Tensor,
        noise: Tensor,
        history_mask: Tensor | None = None,
        num_steps: int | None = None,
        image_tokens: tuple[list[int], list[int]] | None = None,
        trace_steps: bool = False,
    ) -> dict[str, Tensor]:
        """Euler from t = 1 to 0 in control-point space, in the reference's conventions.

        rgb/depth_rgb float[B, 3, S, S] in [0, 1]; current_kp float[B, N, 3] (reference uv, z m);
        traj_history float[B, N, h, 3] anchor-relative, oldest first; point_mask bool[B, N];
        noise float[B, N, C, 3]. Returns ctrl, traces (scaled, relative), traces_abs and
        done_prob float[B, N, H] (probability that the step still belongs to the motion).
        """
        steps = num_steps or self.cfg.num_steps
        B, N = point_mask.shape
        if history_mask is None:
            history_mask = torch.ones_like(point_mask)
        rgb_in = rgb * 2.0 - 1.0
        depth_in = depth_rgb * 2.0 - 1.0 if depth_rgb is not None else None
        if depth_in is not None and depth_mask is None:
            depth_mask = torch.ones(B, dtype=torch.bool, device=rgb.device)
        with self._autocast():
            prefix, prefix_pad = self.embed_prefix(
                rgb_in, depth_in, depth_mask, lang_tokens, lang_mask, image_tokens
            )
            cache = self.fill_cache(prefix, prefix_pad)
        uv = current_kp[..., :2]
        dino = self.dino_features(rgb_in, uv, point_mask) if self.dino is not None else None
        x = noise.float()
        dt = -1.0 / steps
        done_logits = None
        per_step = {"t": [], "x_t": [], "v": [], "done_logits": []}
        for step in range(steps):
            t = torch.full((B,), 1.0 + step * dt, dtype=torch.float32, device=x.device)
            with self._autocast():
                tokens, _, attend = self.embed_suffix(
                    traj_history, x, uv, point_mask, history_mask, dino
                )
                out = self.expert_forward(tokens, attend, prefix_pad, cache, self.adaln(t))
            out = out.float().reshape(B, N, self.tokens_per_point, -1)[:, :, -self.G_fut :]
            v = self.trace_out_proj_future(out).reshape(B, N, -1, 3)
            if self.trace_done_proj_bsp is not None:
                done_logits = self.trace_done_proj_bsp(out.mean(dim=2))
            if trace_steps:
                per_step["t"].append(t[0])
                per_step["x_t"].append(x)
                per_step["v"].append(v)
                per_step["done_logits"].append(done_logits)
            x = x + dt * v
        traces = torch.einsum("hc,bncd->bnhd", self.basis.to(x.dtype), x)
        scale = torch.tensor(self.cfg.delta_scale, dtype=x.dtype, device=x.device)
        result = {
            "ctrl": x,
            "traces": traces,
            "traces_abs": traces * scale + current_kp[:, :, None, :].float(),
            "prefix_embs": prefix.float(),
            "prefix_pad": prefix_pad,
        }
        if dino is not None:
            result["dino_feat"] = dino.float()
        if done_logits is not None:
            result["done_prob"] = torch.sigmoid(done_logits)
        if trace_steps:
            result.update(
                {f"step_{k}": torch.stack(v) for k, v in per_step.items() if v and v[0] is not None}
            )
        return result

    def _autocast(self):
        dev = self.basis.device
        if dev.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)
