"""Serves the published μ0 (a release directory) through the server's ``TraceModel`` contract.

The wire stays ours: uv pixel-centre aligned, absolute histories with the current position
last, ``done`` True from the step where a point's motion has ended. This adapter converts to
and from the reference's conventions (``mu0_core.published.preprocess``) and maps its done head
(probability that a step still belongs to the motion) onto ``done``: a step is done when that
probability falls below the release's ``done_threshold``, and every step after it stays done.

Requests are batched like any model's: images are preprocessed per request (any size), queries
padded to the batch's largest count (padding is masked out of attention), and each request's
noise comes from its own generator seeded with the server's seed, so a request gets the same
traces whether it was batched with others or not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.model_api import FRAMES_AND_UNITS, HISTORY_STEPS, uvz_to_xyz_cam, validate_observation
from runtime.wire import ErrorCode, WireError


def done_from_valid_prob(valid_prob: np.ndarray, threshold: float) -> np.ndarray:
    """bool[..., H]: True from the first step whose probability of still moving is below
    ``threshold`` (the reference's ``pred_valid_step = p >= threshold``) onwards."""
    return np.logical_or.accumulate(valid_prob < threshold, axis=-1)


class PublishedTraceModel:
    def __init__(self, release, seed: int = 0, max_queries: int | None = None):
        self.release = release
        self.seed = seed
        cfg = release.cfg
        self.max_queries = max_queries or 256
        self._metadata = {
            "model_id": "mu0-published",
            "model_hash": release.content_hash,
            "horizon": cfg.future_len,
            "history_steps": HISTORY_STEPS,
            "num_control_points": cfg.trace_bspline_n_ctrl,
            "knots": "bezier",
            "euler_steps": cfg.num_steps,
            "noise_scale": 1.0,
            "image_size": None,  # any size: preprocessing resizes
            "model_image_size": cfg.image_size,
            "max_queries": self.max_queries,
            "frames": dict(FRAMES_AND_UNITS),
        }

    @classmethod
    def from_release(
        cls,
        release_dir: str | Path,
        vlm_dir: str | Path,
        dino_dir: str | Path | None,
        device: str = "cpu",
        **kwargs,
    ) -> PublishedTraceModel:
        from mu0_core.published.release import load_release

        return cls(load_release(release_dir, vlm_dir, dino_dir, device), **kwargs)

    def metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    def validate(self, obs: dict[str, Any]) -> None:
        validate_observation(obs, None, self.max_queries, HISTORY_STEPS)
        if not np.isfinite(obs["hist_uvz"][:, -1]).all():
            raise WireError(
                ErrorCode.BAD_SHAPE, "'hist_uvz': every query's current position must be finite"
            )

    @torch.no_grad()
    def predict_batch(self, observations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from mu0_core.published import preprocess

        rel = self.release
        cfg, dev = rel.cfg, rel.device
        B = len(observations)
        counts = [int(o["hist_uvz"].shape[0]) for o in observations]
        N, h, C = max(counts), cfg.history_len, cfg.trace_bspline_n_ctrl
        S = cfg.image_size

        rgb = torch.cat(
            [
                preprocess.resize_images(preprocess.rgb_to_tensor(o["rgb"][None]), S)
                for o in observations
            ]
        )
        depth = torch.zeros_like(rgb)
        has_depth = torch.zeros(B, dtype=torch.bool)
        for i, o in enumerate(observations):
            if o.get("depth_m") is not None and cfg.use_depth:
                depth[i] = preprocess.depth_to_tensor(o["depth_m"][None], rel.depth_log_range, S)[0]
                has_depth[i] = True
        tokens, lang_mask = preprocess.tokenize(
            rel.tokenizer, [o["instruction"] for o in observations], cfg.tokenizer_max_length
        )

        current = torch.zeros(B, N, 3)
        history = torch.zeros(B, N, h, 3)
        has_history = torch.zeros(B, N, dtype=torch.bool)
        point_mask = torch.zeros(B, N, dtype=torch.bool)
        noise = torch.zeros(B, N, C, 3)
        for i, o in enumerate(observations):
            n = counts[i]
            H_img, W_img = o["rgb"].shape[:2]
            cur, hist, known = preprocess.history_to_reference(
                o["hist_uvz"], o.get("hist_valid"), W_img, H_img, h
            )
            current[i, :n] = torch.from_numpy(cur)
            history[i, :n] = torch.from_numpy(hist)
            has_history[i, :n] = torch.from_numpy(known)
            point_mask[i, :n] = True
            g = torch.Generator().manual_seed(self.seed)
            noise[i, :n] = torch.randn(n, C, 3, generator=g)

        out = rel.model.sample(
            rgb.to(dev),
            depth.to(dev) if cfg.use_depth else None,
            has_depth.to(dev),
            tokens.to(dev),
            lang_mask.to(dev),
            current.to(dev),
            history.to(dev),
            point_mask.to(dev),
            noise.to(dev),
            history_mask=has_history.to(dev),
            image_tokens=rel.image_tokens,
        )
        traces = out["traces_abs"].float().cpu().numpy()
        valid_prob = out["done_prob"].float().cpu().numpy() if "done_prob" in out else None
        replies = []
        for i, o in enumerate(observations):
            n = counts[i]
            H_img, W_img = o["rgb"].shape[:2]
            uvz = traces[i, :n].copy()
            uvz[..., :2] = preprocess.reference_to_ours_uv(uvz[..., :2], W_img, H_img)
            done = (
                done_from_valid_prob(valid_prob[i, :n], cfg.done_threshold)
                if valid_prob is not None
                else np.zeros(uvz.shape[:2], dtype=bool)
            )
            replies.append(
                {
                    "traces_uvz": np.ascontiguousarray(uvz, dtype=np.float32),
                    "traces_xyz_cam": uvz_to_xyz_cam(uvz, o["intrinsics"], W_img, H_img),
                    "done": np.ascontiguousarray(done),
                }
            )
        return replies
