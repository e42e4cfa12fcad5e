"""The simulated frames that ship for `mu0 predict`: consistent, and forecast on end to end."""

from __future__ import annotations

import numpy as np
import pytest

from mu0_core.examples import DEFAULT, load_example, names


def test_the_default_example_is_a_real_frame_with_history_and_truth():
    assert DEFAULT in names()
    query, truth = load_example()
    rgb = np.asarray(query.rgb)
    H, W, _ = rgb.shape
    N = len(query.hist_uvz)
    assert rgb.dtype == np.uint8 and rgb.std() > 10  # a rendered scene, not a blank
    assert query.depth_m.shape == (H, W) and (query.depth_m > 0).mean() > 0.9
    assert truth["gt_future_uvz"].shape == (N, 32, 3) and truth["gt_future_valid"].any()
    # The truth starts where each point is now (the last history step).
    np.testing.assert_allclose(truth["gt_future_uvz"][:, 0], query.hist_uvz[:, -1], atol=1e-4)
    assert query.hist_valid[:, -1].all() and query.hist_valid.sum() > N  # real motion history
    with pytest.raises(FileNotFoundError, match="shipped"):
        load_example("no_such_frame")


def test_predict_with_no_inputs_forecasts_on_the_shipped_frame(tmp_path, capsys):
    from runtime.cli import main

    out = tmp_path / "p.png"
    assert main(["predict", "--checkpoint", "checkpoints/tiny", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Stack-UR5e" in text and "against the simulator's truth" in text
    assert out.stat().st_size > 10_000
