"""A disk cache of frozen-encoder features, so training pays for the frozen encoders once.

Entries are safetensors files named by a hash of the inputs (image bytes, depth bytes,
instruction) and of the backbone's fingerprint, so a different encoder never reads another's
features. Writes go through a temporary file and a rename: an interrupted run leaves no
half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


class FeatureCache:
    def __init__(self, directory: str | Path, backbone):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.backbone = backbone
        fp = json.dumps(
            {"fingerprint": backbone.fingerprint(), "type": type(backbone).__name__}, sort_keys=True
        )
        self._salt = hashlib.sha256(fp.encode()).hexdigest()[:16]
        self.hits = 0
        self.misses = 0

    def key(self, rgb: np.ndarray, depth_m: np.ndarray | None, instruction: str) -> str:
        h = hashlib.sha256(self._salt.encode())
        h.update(np.ascontiguousarray(rgb).tobytes())
        h.update(str(rgb.shape).encode())
        if depth_m is not None:
            h.update(np.ascontiguousarray(depth_m, dtype=np.float32).tobytes())
        h.update(instruction.encode())
        return h.hexdigest()

    def encode(
        self, rgb: np.ndarray, depth_m: np.ndarray | None, instruction: str
    ) -> dict[str, torch.Tensor]:
        """Features of one frame (no batch dim), from the cache or computed and stored."""
        path = self.directory / f"{self.key(rgb, depth_m, instruction)}.safetensors"
        if path.is_file():
            self.hits += 1
            return load_file(str(path))
        self.misses += 1
        depth = (
            None
            if depth_m is None
            else torch.as_tensor(np.asarray(depth_m, dtype=np.float32))[None]
        )
        feats = self.backbone.encode_frozen(torch.as_tensor(rgb)[None], depth, [instruction])
        feats = {k: v[0].detach().cpu().contiguous() for k, v in feats.items()}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks may write the same entry at once
        save_file(feats, str(tmp))
        tmp.replace(path)
        return feats

    @staticmethod
    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}
