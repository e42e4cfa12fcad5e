"""Serves a μ0 checkpoint through the server's ``TraceModel`` contract (server side only).

Observations from many clients are batched: the frozen encoders run once per group of
same-sized images, queries are padded to the batch's largest count (padding is masked out of
attention), and each request's noise is drawn from its own seeded generator, so a request gets
the same traces whether it was batched with others or not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from runtime.model_api import FRAMES_AND_UNITS, validate_observation

DEFAULT_MAX_QUERIES = 256


class Mu0TraceModel:
    def __init__(
        self,
        model,
        meta: dict[str, Any] | None = None,
        max_queries: int = DEFAULT_MAX_QUERIES,
        seed: int = 0,
        noise_scale: float | None = None,
    ):
        self.model = model.eval()
        self.meta = meta or {}
        self.max_queries = max_queries
        self.seed = seed
        self.noise_scale = model.noise_scale(noise_scale)  # refused here, at start, if invalid
        self.device = model.basis.device
        cfg = model.cfg
        self._metadata = {
            "model_id": f"mu0-{cfg.name}",
            "model_hash": self.meta.get("content_hash", "untrained"),
            "horizon": cfg.trace.horizon,
            "history_steps": cfg.trace.history_steps,
            "num_control_points": cfg.trace.num_ctrl,
            "knots": cfg.trace.knots,
            "euler_steps": cfg.train.num_sample_steps,
            "noise_scale": self.noise_scale,
            "image_size": None,  # any size: the backbone resizes
            "model_image_size": getattr(cfg.backbone, "image_size", None),
            "max_queries": max_queries,
            "frames": dict(FRAMES_AND_UNITS),
        }

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu", **kwargs) -> Mu0TraceModel:
        from mu0_core.checkpoint import load_checkpoint

        model, meta = load_checkpoint(path, device)
        return cls(model, meta, **kwargs)

    def metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    def validate(self, obs: dict[str, Any]) -> None:
        validate_observation(obs, None, self.max_queries, self.model.cfg.trace.history_steps)

    @torch.no_grad()
    def predict_batch(self, observations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        model, dev = self.model, self.device
        B = len(observations)
        T = model.cfg.trace.history_steps
        counts = [int(o["hist_uvz"].shape[0]) for o in observations]
        N = max(counts)

        # Frozen encoders: one call per group of same-sized images with the same inputs.
        groups: dict[tuple, list[int]] = {}
        for i, o in enumerate(observations):
            key = (o["rgb"].shape, o.get("depth_m") is not None)
            groups.setdefault(key, []).append(i)
        parts: list[tuple[list[int], dict[str, torch.Tensor]]] = []
        for (_, has_depth), idx in groups.items():
            rgb = torch.from_numpy(np.stack([observations[i]["rgb"] for i in idx]))
            depth = (
                torch.from_numpy(np.stack([observations[i]["depth_m"] for i in idx]))
                if has_depth
                else None
            )
            feats = model.backbone.encode_frozen(
                rgb, depth, [observations[i]["instruction"] for i in idx]
            )
            parts.append((idx, feats))
        order = [i for idx, _ in parts for i in idx]
        frozen = {k: torch.cat([f[k] for _, f in parts]) for k in parts[0][1]}
        inverse = torch.empty(B, dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(B)
        frozen = {k: v[inverse.to(v.device)] for k, v in frozen.items()}  # back to request order

        hist = torch.zeros(B, N, T, 3)
        valid = torch.zeros(B, N, T, dtype=torch.bool)
        point_mask = torch.zeros(B, N, dtype=torch.bool)
        noise = torch.zeros(B, N, model.num_free, 3)
        intrinsics = torch.zeros(B, 4)
        image_size = torch.zeros(B, 2)
        for i, o in enumerate(observations):
            n = counts[i]
            hist[i, :n] = torch.tensor(o["hist_uvz"])  # copies: wire arrays are read-only
            hv = o.get("hist_valid")
            valid[i, :n] = torch.tensor(hv) if hv is not None else True
            point_mask[i, :n] = True
            g = torch.Generator().manual_seed(self.seed)
            noise[i, :n] = torch.randn(n, model.num_free, 3, generator=g)
            intrinsics[i] = torch.tensor(o["intrinsics"])
            image_size[i] = torch.tensor(
                [o["rgb"].shape[1], o["rgb"].shape[0]], dtype=torch.float32
            )
            # Padded queries copy a real one so every padded row stays finite.
            hist[i, n:] = hist[i, :1]
            valid[i, n:] = valid[i, :1]

        out = model.sample_batch(
            frozen,
            hist.to(dev),
            valid.to(dev),
            point_mask.to(dev),
            intrinsics.to(dev),
            image_size.to(dev),
            noise=noise.to(dev),
            noise_scale=self.noise_scale,
        )
        traces = out["traces_uvz"].float().cpu().numpy()
        xyz = out["traces_xyz_cam"].float().cpu().numpy()
        done = out["done"].cpu().numpy()
        return [
            {
                "traces_uvz": np.ascontiguousarray(traces[i, : counts[i]], dtype=np.float32),
                "traces_xyz_cam": np.ascontiguousarray(xyz[i, : counts[i]], dtype=np.float32),
                "done": np.ascontiguousarray(done[i, : counts[i]]),
            }
            for i in range(B)
        ]


def tiny_untrained() -> Mu0TraceModel:
    """The tiny preset with random trainable weights: real compute, for benchmarks."""
    from configs import get_model_config
    from mu0_core.model import Mu0

    torch.manual_seed(0)
    return Mu0TraceModel(Mu0(get_model_config("tiny")).eval())
