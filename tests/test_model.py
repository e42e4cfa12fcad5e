"""The μ0 model: freezing, order-free queries, determinism, and learning a small batch."""

from __future__ import annotations

import copy

import torch

from mu0_core import synthetic
from mu0_core.types import HORIZON, NUM_CONTROL_POINTS


def test_pretrained_encoders_are_frozen(tiny_model):
    counts = tiny_model.count_parameters()
    frozen_modules = tiny_model.backbone.frozen_modules()
    frozen_numel = sum(p.numel() for m in frozen_modules.values() for p in m.parameters())
    assert frozen_numel > 20_000_000  # EfficientNet-Lite0 trunk + MiniLM
    assert counts["frozen"] == frozen_numel
    assert counts["trainable"] == counts["total"] - frozen_numel
    for m in frozen_modules.values():
        assert not any(p.requires_grad for p in m.parameters())
    # The frozen encoders stay in eval mode when the model is put in training mode.
    model = copy.deepcopy(tiny_model).train()
    assert all(
        not m.training for fm in model.backbone.frozen_modules().values() for m in fm.modules()
    )
    # And gradients never reach them.
    loss, _ = model.loss(synthetic.make_batch(2, 4, seed=1))
    loss.backward()
    assert all(p.grad is None for m in frozen_modules.values() for p in m.parameters())
    assert model.expert.velocity_head.weight.grad is not None


def test_sample_shapes_units_and_determinism(tiny_model):
    q = synthetic.make_query(12, seed=3)
    a = tiny_model.sample(q, seed=7)
    b = tiny_model.sample(q, seed=7)
    c = tiny_model.sample(q, seed=8)
    assert a.traces_uvz.shape == (12, HORIZON, 3)
    assert a.ctrl_rel.shape == (12, NUM_CONTROL_POINTS, 3)
    assert a.done.shape == (12, HORIZON) and a.done.dtype == torch.bool
    assert torch.equal(a.traces_uvz, b.traces_uvz)  # seeded: identical
    assert not torch.equal(a.traces_uvz, c.traces_uvz)
    # Anchored: the relative trace starts at zero, the absolute one at the current position.
    assert torch.allclose(a.traces_uvz_rel[:, 0], torch.zeros(12, 3), atol=1e-6)
    cur = torch.as_tensor(q.hist_uvz[:, -1])
    assert torch.allclose(a.traces_uvz[:, 0], cur, atol=1e-6)
    # Metric 3D agrees with uvz through the intrinsics (z is depth along the optical axis).
    assert torch.allclose(a.traces_xyz_cam[..., 2], a.traces_uvz[..., 2], atol=1e-6)
    assert torch.isfinite(a.traces_xyz_cam).all()


def test_sampler_noise_scale(tiny_model):
    """The flow starts from N(0, s^2): at 0 the seed no longer matters; the default is the
    config's; a negative scale is refused."""
    q = synthetic.make_query(6, seed=2)
    assert tiny_model.cfg.train.sample_noise_scale == 0.5
    zero_a = tiny_model.sample(q, seed=1, noise_scale=0.0)
    zero_b = tiny_model.sample(q, seed=2, noise_scale=0.0)
    assert torch.equal(zero_a.traces_uvz, zero_b.traces_uvz)
    default = tiny_model.sample(q, seed=1)
    half = tiny_model.sample(q, seed=1, noise_scale=0.5)
    full = tiny_model.sample(q, seed=1, noise_scale=1.0)
    assert torch.equal(default.traces_uvz, half.traces_uvz)
    assert not torch.allclose(half.traces_uvz, full.traces_uvz)
    try:
        tiny_model.sample(q, noise_scale=-1.0)
    except ValueError as exc:
        assert "noise_scale" in str(exc)
    else:
        raise AssertionError("a negative noise scale must be refused")


def test_permuting_queries_permutes_outputs(tiny_model):
    q = synthetic.make_query(10, seed=4)
    noise = torch.randn(10, NUM_CONTROL_POINTS - 1, 3, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    q_perm = type(q)(
        rgb=q.rgb,
        instruction=q.instruction,
        hist_uvz=q.hist_uvz[perm.numpy()],
        intrinsics=q.intrinsics,
        depth_m=q.depth_m,
    )
    a = tiny_model.sample(q, noise=noise)
    b = tiny_model.sample(q_perm, noise=noise[perm])
    assert torch.allclose(a.traces_uvz[perm], b.traces_uvz, atol=1e-5)
    assert torch.equal(a.done[perm], b.done)


def test_rgb_only_and_bad_input(tiny_model):
    q = synthetic.make_query(4, seed=5)
    rgb_only = type(q)(
        rgb=q.rgb, instruction=q.instruction, hist_uvz=q.hist_uvz, intrinsics=q.intrinsics
    )
    assert torch.isfinite(tiny_model.sample(rgb_only).traces_uvz).all()
    bad = type(q)(
        rgb=q.rgb, instruction=q.instruction, hist_uvz=q.hist_uvz[:, :3], intrinsics=q.intrinsics
    )
    try:
        tiny_model.sample(bad)
    except ValueError as e:
        assert "hist_uvz" in str(e)
    else:
        raise AssertionError("a wrong history length must raise")


def test_tiny_overfits_a_small_batch(tiny_model):
    """Loss on a fixed synthetic batch falls at least tenfold (measured on fixed noise and times)."""
    torch.manual_seed(0)
    model = copy.deepcopy(tiny_model).train()
    batch = synthetic.make_batch(4, 8, seed=11)
    batch.frozen = model.encode_frozen(batch)  # frozen encoders run once, as training caches them
    model.compute_normalization([batch])

    def eval_loss() -> float:
        g = torch.Generator().manual_seed(123)
        model.eval()
        with torch.no_grad():
            value = sum(model.loss(batch, generator=g)[0].item() for _ in range(4)) / 4
        model.train()
        return value

    before = eval_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for _ in range(400):
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before / 10, (before, after)


def test_feature_cache_reuses_frozen_features(tiny_model, tmp_path):
    from mu0_core.feature_cache import FeatureCache

    batch = synthetic.make_batch(2, 4, seed=21)
    cache = FeatureCache(tmp_path, tiny_model.backbone)
    frames = [
        (batch.rgb[i].numpy(), batch.depth_m[i].numpy(), batch.instructions[i]) for i in range(2)
    ]
    first = FeatureCache.collate([cache.encode(*f) for f in frames])
    again = FeatureCache.collate([cache.encode(*f) for f in frames])
    assert (cache.misses, cache.hits) == (2, 2)
    fresh = tiny_model.backbone.encode_frozen(batch.rgb, batch.depth_m, batch.instructions)
    for k in fresh:
        assert torch.allclose(first[k], fresh[k], atol=1e-5), k
        assert torch.equal(first[k], again[k])
    # A different instruction is a different entry.
    cache.encode(frames[0][0], frames[0][1], "something else")
    assert cache.misses == 3
