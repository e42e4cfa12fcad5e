"""The μ0 adapter behind the trace server: the wire contract, and batching that never changes
an answer."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.model_api import make_observation
from runtime.mu0_adapter import Mu0TraceModel
from runtime.wire import WireError


@pytest.fixture(scope="module")
def adapter(tiny_model):
    return Mu0TraceModel(tiny_model, max_queries=32)


def test_metadata_and_validation(adapter):
    meta = adapter.metadata()
    assert meta["horizon"] == 32 and meta["history_steps"] == 8 and meta["max_queries"] == 32
    assert "metres" in meta["frames"]["z"]
    adapter.validate(make_observation(8))
    bad = make_observation(8)
    bad["hist_uvz"] = bad["hist_uvz"][:, :5]
    with pytest.raises(WireError):
        adapter.validate(bad)
    with pytest.raises(WireError):
        adapter.validate(make_observation(33))


def test_noise_scale_is_served_and_announced(tiny_model, adapter):
    """The server's sampler temperature is the checkpoint's unless overridden, and the
    handshake says which (the sampler itself is tested with the model)."""
    assert adapter.metadata()["noise_scale"] == tiny_model.cfg.train.sample_noise_scale
    cold = Mu0TraceModel(tiny_model, max_queries=32, noise_scale=0.0)
    assert cold.metadata()["noise_scale"] == 0.0
    assert cold.predict_batch([make_observation(5, seed=3)])[0]["traces_uvz"].shape == (5, 32, 3)
    with pytest.raises(ValueError, match="noise_scale"):
        Mu0TraceModel(tiny_model, noise_scale=-0.1)


def test_batched_equals_alone(adapter):
    obs = [
        make_observation(4, image_size=(160, 120), seed=0),
        make_observation(
            9, image_size=(224, 224), depth=False, seed=1, instruction="open the door"
        ),
        make_observation(6, image_size=(160, 120), seed=2),
    ]
    batched = adapter.predict_batch(obs)
    for o, b in zip(obs, batched):
        alone = adapter.predict_batch([o])[0]
        n = o["hist_uvz"].shape[0]
        assert b["traces_uvz"].shape == (n, 32, 3) and b["traces_uvz"].dtype == np.float32
        assert b["traces_xyz_cam"].shape == (n, 32, 3) and b["done"].dtype == np.bool_
        np.testing.assert_allclose(b["traces_uvz"], alone["traces_uvz"], atol=2e-5)
        np.testing.assert_array_equal(b["done"], alone["done"])
        # Every trace starts at the point's current position.
        np.testing.assert_allclose(b["traces_uvz"][:, 0], o["hist_uvz"][:, -1], atol=1e-5)
