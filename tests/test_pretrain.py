"""Pretraining: a couple of steps, a checkpoint that loads, and resume that continues."""

from __future__ import annotations

import json

import torch

from mu0_core import synthetic
from mu0_core.checkpoint import load_checkpoint
from mu0_core.pretrain import PretrainConfig, augment_queries, pretrain


def _cfg(tmp_path, steps):
    return PretrainConfig(
        out_dir=str(tmp_path / "run"),
        steps=steps,
        batch_size=2,
        max_points=6,
        warmup_steps=1,
        log_every=1,
        eval_every=2,
        eval_batches=1,
        save_every=2,
        normalization_batches=2,
        device="cpu",
    )


def test_train_two_steps_then_resume(tiny_config, tmp_path):
    train = synthetic.SyntheticTraceDataset(6, num_points=8, seed=0)
    val = synthetic.SyntheticTraceDataset(2, num_points=8, seed=1)
    final = pretrain(tiny_config, _cfg(tmp_path, 2), train, val)
    model, meta = load_checkpoint(final)
    assert meta["extra"]["step"] == 2
    assert model.normalization()["ctrl_std"] != [[0.05, 0.05, 0.02]] * 9  # computed from data
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert "val_ade3d_m" in rows[-1] and rows[-1]["val_ade3d_m"] > 0
    assert (run / "loss.png").stat().st_size > 1000
    assert len(list((run / "feature_cache").glob("*.safetensors"))) >= 6  # frozen features cached

    last_state = json.loads((run / "last" / "trainer_state.json").read_text())
    assert last_state["step"] == 2
    before, _ = load_checkpoint(run / "last")
    pretrain(tiny_config, _cfg(tmp_path, 4), train, val, resume=True)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # continued, not restarted
    after, meta = load_checkpoint(run / "final")
    assert meta["extra"]["step"] == 4
    assert before.normalization() == after.normalization()  # statistics kept on resume
    w0 = before.expert.velocity_head.weight
    assert not torch.equal(w0, after.expert.velocity_head.weight)  # it trained further


def test_query_augmentation_keeps_current_position():
    batch = synthetic.make_batch(3, 10, seed=0)
    from dataclasses import replace

    cfg = replace(_cfg(__import__("pathlib").Path("/tmp"), 1), hist_mask_prob=1.0)
    out = augment_queries(batch, cfg, torch.Generator().manual_seed(0))
    assert out.hist_valid[..., -1].all()  # now is always known
    assert (~out.hist_valid).any()  # some history was masked
    dz = out.hist_uvz[..., 2] - batch.hist_uvz[..., 2]
    assert torch.allclose(dz, dz[..., :1].expand_as(dz))  # one depth offset per point
    assert torch.equal(out.hist_uvz[..., :2], batch.hist_uvz[..., :2])
