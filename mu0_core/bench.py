"""Model benchmark: parameter counts and CPU latency of ``sample`` per preset.

Latency covers one whole prediction as a server sees it: the frozen encoders on the image and
depth, the fusion, and the trace expert's Euler steps. The instruction's text features are
cached after the first call (instructions repeat frame after frame), and the figure without the
cache is reported separately as ``text_encode_ms``.
"""

from __future__ import annotations

import gc
import time
from functools import partial
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mu0_core import synthetic


def _percentiles(samples_s: list[float]) -> tuple[float, float]:
    ms = np.asarray(samples_s) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 90))


def _header(
    counts: dict[str, int], build_s: float, device: str, num_steps: int, random_weights: bool
) -> dict[str, Any]:
    return {
        "params_total": counts["total"],
        "params_trainable": counts["trainable"],
        "params_frozen": counts["frozen"],
        "build_s": round(build_s, 2),
        "device": device,
        "num_steps": num_steps,
        "random_weights": random_weights,
    }


def _time_runs(run, repeats: int, warmup: int, device: str, desc: str) -> tuple[float, float]:
    """(p50, p90) in ms of ``run()`` after ``warmup`` untimed calls, synchronising CUDA."""
    for _ in range(warmup):
        run()
    times = []
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return _percentiles(times)


def bench_preset(
    cfg,
    queries: tuple[int, ...] = (16, 64),
    repeats: int = 30,
    warmup: int = 3,
    num_steps: int = 4,
    device: str = "cpu",
) -> dict[str, Any]:
    if getattr(cfg, "kind", None) == "published":
        return bench_published(cfg, queries, repeats, min(warmup, 1), num_steps, device)
    from mu0_core.model import Mu0

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = Mu0(cfg).to(device).eval()
    build_s = time.perf_counter() - t0
    random = getattr(cfg.backbone, "model_dir", None) is None and cfg.backbone.kind == "hf"
    out = _header(model.count_parameters(), build_s, device, num_steps, random)
    size = getattr(cfg.backbone, "image_size", None) or 224
    for q in queries:
        query = synthetic.make_query(q, image_size=(size, size), seed=q)
        p50, p90 = _time_runs(
            partial(model.sample, query, num_steps=num_steps),
            repeats,
            warmup,
            device,
            f"{cfg.name} q{q}",
        )
        out[f"sample_ms_p50_q{q}"] = round(p50, 2)
        out[f"sample_ms_p90_q{q}"] = round(p90, 2)
    # Cold text encoding (a new instruction), once per instruction in practice.
    if hasattr(model.backbone, "_text_cache"):
        model.backbone._text_cache.clear()
        t = time.perf_counter()
        model.backbone._encode_text(["a new instruction nobody used before"], torch.device(device))
        out["text_encode_ms"] = round(1e3 * (time.perf_counter() - t), 2)
    del model
    gc.collect()
    return out


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def bench_published(
    preset,
    queries: tuple[int, ...] = (16, 64),
    repeats: int = 3,
    warmup: int = 1,
    num_steps: int = 4,
    device: str = "cpu",
) -> dict[str, Any]:
    """The published architecture (``paper``) with random weights: parameter count and
    ``PublishedMu0.sample`` latency on one 512 px RGB-D frame (prefix, DINOv2, Euler steps;
    camera preprocessing excluded). fp32 on CPU, bf16 autocast on CUDA, DINOv2 bf16 always."""
    from mu0_core.published.preset import build_random, describe, dummy_inputs, parameter_counts

    t0 = time.perf_counter()
    model = build_random(preset, device)
    build_s = time.perf_counter() - t0
    out = _header(parameter_counts(model), build_s, device, num_steps, random_weights=True)
    out["architecture"] = "published μ0 (mu0_core/published)"
    out.update(describe(model))
    for q in queries:
        inputs = dummy_inputs(model, q, seed=q)
        p50, p90 = _time_runs(
            partial(model.sample, **inputs, num_steps=num_steps),
            repeats,
            warmup,
            device,
            f"{preset.name} q{q}",
        )
        out[f"sample_ms_p50_q{q}"] = round(p50, 2)
        out[f"sample_ms_p90_q{q}"] = round(p90, 2)
    if device.startswith("cuda"):
        out["gpu_peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    out["peak_rss_gb"] = round(_peak_rss_gb(), 2)
    del model
    gc.collect()
    return out
