"""Checkpoints: safetensors + JSON, self-contained, strict on load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mu0_core import synthetic
from mu0_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mu0_core.config import ExpertConfig, HFBackboneConfig, Mu0Config
from mu0_core.model import Mu0


@pytest.fixture(scope="module")
def saved_tiny(tiny_model, tmp_path_factory):
    tiny_model.compute_normalization([synthetic.make_batch(2, 8, seed=2)])
    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny", extra={"step": 3})


def test_round_trip_is_exact_and_frozen(tiny_model, saved_tiny):
    meta = json.loads((saved_tiny / "config.json").read_text())
    assert meta["format"] == "mu0-checkpoint" and meta["content_hash"].startswith("sha256:")
    assert meta["code_version"]["mu0"] and meta["extra"] == {"step": 3}
    # Packaged frozen encoders are not stored; the checkpoint stays small.
    stored = load_file(str(saved_tiny / "model.safetensors"))
    assert not any(
        k.startswith(("backbone.image_encoder.", "backbone.text_encoder.")) for k in stored
    )
    assert (saved_tiny / "model.safetensors").stat().st_size < 25 * 2**20

    loaded, _ = load_checkpoint(saved_tiny)
    assert loaded.count_parameters()["trainable"] == 0  # loaded for serving: frozen
    assert loaded.normalization() == tiny_model.normalization()
    q = synthetic.make_query(8, seed=9)
    assert torch.equal(tiny_model.sample(q, seed=1).traces_uvz, loaded.sample(q, seed=1).traces_uvz)


def _rewrite(directory, mutate):
    state = load_file(str(directory / "model.safetensors"))
    mutate(state)
    save_file(state, str(directory / "model.safetensors"))
    meta = json.loads((directory / "config.json").read_text())
    import hashlib

    meta["content_hash"] = (
        "sha256:" + hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    )
    (directory / "config.json").write_text(json.dumps(meta))


def test_strict_loading_names_the_key(saved_tiny, tmp_path):
    import shutil

    cases = {
        "missing key expert.velocity_head.bias": lambda s: s.pop("expert.velocity_head.bias"),
        "unexpected key expert.extra": lambda s: s.__setitem__("expert.extra", torch.zeros(2)),
        "shape mismatch at expert.done_head.bias": lambda s: s.__setitem__(
            "expert.done_head.bias", torch.zeros(5)
        ),
    }
    for needle, mutate in cases.items():
        d = tmp_path / needle.split()[0]
        shutil.copytree(saved_tiny, d)
        _rewrite(d, mutate)
        with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
            load_checkpoint(d)


def test_corruption_and_bad_paths(saved_tiny, tmp_path):
    import shutil

    d = tmp_path / "corrupt"
    shutil.copytree(saved_tiny, d)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="content hash"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="not a μ0 checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    d2 = tmp_path / "other-encoder"
    shutil.copytree(saved_tiny, d2)
    meta = json.loads((d2 / "config.json").read_text())
    meta["external_weights"]["image_encoder_sha256"] = "0" * 64
    (d2 / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="image_encoder_sha256"):
        load_checkpoint(d2)


def test_hf_backbone_model_trains_samples_and_round_trips(tmp_path):
    """The same model code over a transformers VLM read from a local directory."""
    from hf_fixtures import make_tiny_smolvlm_dir

    vlm_dir = make_tiny_smolvlm_dir(tmp_path / "vlm")
    cfg = Mu0Config(
        name="hf-test",
        backbone=HFBackboneConfig(model_dir=str(vlm_dir), num_layers=2, max_text_tokens=8),
        expert=ExpertConfig(width=32, layers=2, heads=2),
    )
    torch.manual_seed(0)
    model = Mu0(cfg)
    counts = model.count_parameters()
    assert 0 < counts["trainable"] < counts["total"]  # the vision tower is frozen
    batch = synthetic.make_batch(2, 4, image_size=(64, 64), seed=0)
    model.compute_normalization([batch])
    model.train()
    loss, _ = model.loss(batch)
    loss.backward()
    model.eval()
    q = synthetic.make_query(4, image_size=(64, 64), seed=1)
    before = model.sample(q, seed=0)
    d = save_checkpoint(model, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(d)
    after = loaded.sample(q, seed=0)
    assert torch.allclose(before.traces_uvz, after.traces_uvz, atol=1e-6)
