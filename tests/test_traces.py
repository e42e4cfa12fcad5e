"""Trace utilities: arc-length re-timing and moving/static flags."""

import numpy as np
import pytest

from mu0_core import traces as tr


def test_line_with_varying_speed_becomes_equally_spaced():
    # Slow then fast along a straight line from (0, 0, 1) to (1, 2, 1), with a pause.
    s = np.concatenate([np.linspace(0, 0.1, 10), [0.1, 0.1], np.linspace(0.1, 1.0, 5)[1:]])
    points = np.array([0.0, 0.0, 1.0]) + s[:, None] * np.array([1.0, 2.0, 0.0])
    out, valid = tr.retime_by_arc_length(points, np.ones(len(s), bool), 11)
    assert out.shape == (11, 3) and valid.all()
    np.testing.assert_allclose(
        out,
        np.array([0.0, 0.0, 1.0]) + np.linspace(0, 1, 11)[:, None] * [1.0, 2.0, 0.0],
        atol=1e-12,
    )
    steps = np.linalg.norm(np.diff(out, axis=0), axis=-1)
    np.testing.assert_allclose(steps, np.sqrt(5) / 10)


def test_corner_is_resampled_along_the_path():
    points = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])  # an L of length 2
    out, _ = tr.retime_by_arc_length(points, np.ones(3, bool), 5)
    np.testing.assert_allclose(out, [[0, 0], [0.5, 0], [1, 0], [1, 0.5], [1, 1]])


def test_static_point_stays_put_and_is_valid():
    points = np.tile([0.3, -0.2, 1.1], (8, 1)) + 1e-9 * np.arange(8)[:, None]
    out, valid = tr.retime_by_arc_length(points, np.ones(8, bool), 32)
    assert valid.all()
    np.testing.assert_array_equal(out, np.tile(points[0], (32, 1)))


def test_invalid_tail_is_dropped():
    points = np.array([[0.0], [1.0], [2.0], [np.nan], [100.0], [200.0]])
    valid = np.array([True, True, True, False, True, True])  # what follows a gap is not used
    out, valid_out = tr.retime_by_arc_length(points, valid, 5)
    assert valid_out.all() and np.isfinite(out).all()
    np.testing.assert_allclose(out[:, 0], [0, 0.5, 1, 1.5, 2])
    # Only the first step valid: that single point holds.
    out, valid_out = tr.retime_by_arc_length(points, np.eye(6, dtype=bool)[0], 4)
    assert valid_out.all() and (out == 0).all()
    # First step invalid: nothing to resample.
    _, valid_out = tr.retime_by_arc_length(points, ~np.eye(6, dtype=bool)[0], 4)
    assert not valid_out.any()


def test_arc_length_measured_in_another_space():
    # uv moves linearly in time, but the metric path covers most of its length early.
    uvz = np.stack([np.linspace(0, 1, 5), np.zeros(5), np.ones(5)], -1)
    xyz = np.stack([[0.0, 0.6, 0.8, 0.9, 1.0], np.zeros(5), np.zeros(5)], -1)
    out, _ = tr.retime_by_arc_length(uvz, np.ones(5, bool), 3, arc_points=xyz)
    # Half of the metric path (0.5) is reached at 0.5 / 0.6 of the first uv step (0.25).
    np.testing.assert_allclose(out[:, 0], [0, 0.25 * 0.5 / 0.6, 1])


def test_retime_rejects_bad_input():
    with pytest.raises(ValueError, match="num_out"):
        tr.retime_by_arc_length(np.zeros((4, 3)), np.ones(4, bool), 1)
    with pytest.raises(ValueError, match=r"\[T, D\]"):
        tr.retime_by_arc_length(np.zeros((4, 3)), np.ones(5, bool), 8)
    with pytest.raises(ValueError, match="non-finite"):
        tr.retime_by_arc_length(np.array([[0.0], [np.inf]]), np.ones(2, bool), 8)


def test_is_moving_per_point():
    t = np.linspace(0, 1, 6)[:, None]
    still = np.zeros((6, 3))
    mover = t * [0.1, 0.0, 0.0]  # 0.1 m
    there_and_back = np.concatenate([t[:3], t[2::-1]], 0) * [0.05, 0, 0]  # net 0, path 0.04
    jump_over_gap = np.concatenate([np.zeros((3, 3)), np.ones((3, 3))])  # moves only across a gap
    points = np.stack([still, mover, there_and_back, jump_over_gap])
    valid = np.ones((4, 6), bool)
    valid[3, 2:4] = False
    np.testing.assert_allclose(tr.path_length(points, valid), [0, 0.1, 0.04, 0], atol=1e-12)
    np.testing.assert_array_equal(tr.is_moving(points, valid, 0.01), [False, True, True, False])
    with pytest.raises(ValueError):
        tr.is_moving(points, valid[:, :5], 0.01)


def test_batch_retiming_matches_one_trace_at_a_time():
    rng = np.random.default_rng(0)
    B, T = 40, 12
    points, arc = rng.normal(size=(B, T, 3)).cumsum(1), rng.normal(size=(B, T, 3)).cumsum(1)
    valid = rng.uniform(size=(B, T)) > 0.1
    valid[:3, 0] = False  # nothing to resample
    points[3:6], arc[3:6] = points[3:6, :1], arc[3:6, :1]  # standing still
    points[6:9, 4], arc[6:9, 4] = points[6:9, 3], arc[6:9, 3]  # a pause
    out, out_valid = tr.retime_by_arc_length_batch(points, valid, 9, 1e-3, arc)
    for b in range(B):
        one, one_valid = tr.retime_by_arc_length(points[b], valid[b], 9, 1e-3, arc[b])
        np.testing.assert_allclose(out[b], one, atol=1e-12)
        np.testing.assert_array_equal(out_valid[b], one_valid)
