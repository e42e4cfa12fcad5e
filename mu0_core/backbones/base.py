"""The backbone (prefix) interface every implementation follows.

A backbone turns an RGB image, an optional depth image and an instruction into
1. prefix tokens the trace expert attends to, and
2. image-aligned feature maps the expert samples at each query point's pixel.

It is split in two so training can cache what frozen encoders compute:
``encode_frozen`` runs only frozen parts (no gradients, cacheable per frame), and
``forward`` runs the trainable rest on those features. Depth dropout happens in
``forward`` (a per-sample keep mask), so cached features serve every dropout draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Prefix:
    tokens: Tensor  # float32[B, P, D_prefix]
    mask: Tensor  # bool[B, P]; True = attend
    feature_maps: list[Tensor]  # each float32[B, C_i, h_i, w_i], aligned with the image


class Backbone(nn.Module):
    """Abstract prefix encoder. Subclasses set ``prefix_dim`` and ``point_feature_dim``."""

    prefix_dim: int
    point_feature_dim: int  # sum of C_i over ``feature_maps``

    @torch.no_grad()
    def encode_frozen(
        self,
        rgb: Tensor,  # uint8[B, H, W, 3]
        depth_m: Tensor | None,  # float32[B, H, W] metres, or None
        instructions: list[str],
    ) -> dict[str, Tensor]:
        """Features of the frozen encoders: batch-first tensors, safe to cache and collate."""
        raise NotImplementedError

    def forward(self, frozen: dict[str, Tensor], depth_keep: Tensor | None = None) -> Prefix:
        """Trainable part. ``depth_keep``: bool[B]; False drops that sample's depth."""
        raise NotImplementedError

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Name → module of the pretrained parts that stay frozen (counted by tests)."""
        raise NotImplementedError

    def external_state_prefixes(self) -> tuple[str, ...]:
        """State-dict key prefixes (relative to this module) that a checkpoint need not store
        because they come from a package or local directory (verified by ``fingerprint``)."""
        return ()

    def fingerprint(self) -> dict[str, str]:
        """Identifies the external weights (source and content hash) for checkpoint checks."""
        return {}
