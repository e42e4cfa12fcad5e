"""B-splines: knots, Cox–de Boor basis and derivatives, continuity, fitting in numpy and torch."""

import numpy as np
import pytest
import torch

from mu0_core import bspline as bs

KINDS = ["uniform", "bezier"]
T32 = np.linspace(0.0, 1.0, 32)


def cubic(t):
    """[T, 3] a cubic polynomial curve in 3D."""
    return np.stack([1 + 2 * t - 3 * t**2 + 4 * t**3, -0.5 * t**3 + t, 0.2 - t**2], -1)


def test_knot_layouts():
    uniform = bs.make_knots("uniform", 10)
    assert len(uniform) == 14
    np.testing.assert_allclose(uniform[4:10], np.arange(1, 7) / 7)  # 6 simple interior knots
    bezier = bs.make_knots("bezier", 10)
    np.testing.assert_allclose(bezier[4:10], [1 / 3] * 3 + [2 / 3] * 3)  # 3 cubic segments


@pytest.mark.parametrize(
    "args, match",
    [
        (("bezier", 9), "num_ctrl - 1"),
        (("spline", 10), "unknown knot kind"),
        (("uniform", 3), "needs >= 4"),
    ],
)
def test_make_knots_rejects_bad_args(args, match):
    with pytest.raises(ValueError, match=match):
        bs.make_knots(*args)


def test_basis_rejects_bad_args():
    knots = bs.make_knots("uniform", 10)
    with pytest.raises(ValueError, match="inside"):
        bs.basis_matrix(knots, [1.5])
    with pytest.raises(ValueError, match="non-decreasing"):
        bs.basis_matrix(knots[::-1], [0.5])
    with pytest.raises(ValueError, match="derivative"):
        bs.basis_matrix(knots, [0.5], derivative=-1)
    with pytest.raises(ValueError, match="basis must be"):
        bs.fit(np.zeros((32, 3)), np.zeros((31, 10)))
    with pytest.raises(ValueError, match="horizon"):
        bs.SplineSpec("uniform", horizon=1)


@pytest.mark.parametrize("kind", KINDS)
def test_partition_of_unity_and_clamped_ends(kind):
    B = bs.basis_matrix(bs.make_knots(kind, 10), np.linspace(0, 1, 257))
    assert B.shape == (257, 10)
    np.testing.assert_allclose(B.sum(1), 1.0, atol=1e-12)
    assert B.min() >= 0.0
    # Clamped: the curve starts at ctrl[0] and ends at ctrl[-1] (t = 1 included).
    np.testing.assert_allclose(B[0], np.eye(10)[0])
    np.testing.assert_allclose(B[-1], np.eye(10)[-1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("derivative", [1, 2])
def test_derivatives_match_finite_differences(kind, derivative):
    knots = bs.make_knots(kind, 10)
    h = 1e-5
    # Stay away from the knots, where one-sided derivatives of a C0 spline differ.
    t = np.array([0.05, 0.21, 0.4, 0.55, 0.8, 0.97])
    lower = bs.basis_matrix(knots, t, derivative=derivative - 1)
    numeric = (
        bs.basis_matrix(knots, t + h, derivative=derivative - 1)
        - bs.basis_matrix(knots, t - h, derivative=derivative - 1)
    ) / (2 * h)
    exact = bs.basis_matrix(knots, t, derivative=derivative)
    np.testing.assert_allclose(exact, numeric, rtol=1e-5, atol=1e-4 * np.abs(exact).max())
    assert lower.shape == exact.shape
    # Derivatives beyond the degree vanish.
    assert not bs.basis_matrix(knots, t, derivative=4).any()


def test_measured_continuity():
    assert bs.measured_continuity(bs.make_knots("uniform", 10)) == 2
    assert bs.measured_continuity(bs.make_knots("bezier", 10)) == 0
    # A single cubic Bézier segment is one polynomial: smooth up to its degree.
    assert bs.measured_continuity(bs.make_knots("bezier", 4)) == 3
    # Quadratic uniform spline: C1.
    assert bs.measured_continuity(bs.make_knots("uniform", 8, degree=2), degree=2) == 1


@pytest.mark.parametrize("anchor", [True, False])
def test_fit_recovers_a_cubic_exactly(anchor):
    B = bs.basis_matrix(bs.make_knots("uniform", 10), T32)
    y = cubic(T32)
    ctrl = bs.fit(y, B, smoothing=0.0, anchor=anchor)
    assert ctrl.shape == (10, 3) and ctrl.dtype == np.float64
    np.testing.assert_allclose(bs.evaluate(ctrl, B), y, atol=1e-6)


def test_anchor_holds_exactly_against_the_data():
    rng = np.random.default_rng(0)
    B = bs.basis_matrix(bs.make_knots("uniform", 10), T32)
    y = cubic(T32)[None] + rng.normal(scale=0.05, size=(4, 32, 3))
    y[:, 0] += 1.0  # an outlier start the unanchored least squares would not pass through
    ctrl = bs.fit(y, B, smoothing=1e-2, anchor=True)
    np.testing.assert_array_equal(ctrl[:, 0], y[:, 0])
    np.testing.assert_array_equal(bs.evaluate(ctrl, B)[:, 0], y[:, 0])
    assert np.abs(bs.fit(y, B, smoothing=1e-2, anchor=False)[:, 0] - y[:, 0]).max() > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_masked_fit_holds_still_instead_of_exploding(kind):
    B = bs.basis_matrix(bs.make_knots(kind, 10), T32)
    y = cubic(T32)
    mask = np.zeros(32, bool)
    mask[:10] = True  # 70% of the horizon masked
    y_garbage = y.copy()
    y_garbage[10:] = 1e6  # masked samples must not leak in
    fitted = bs.evaluate(bs.fit(y_garbage, B, mask=mask), B)
    assert np.isfinite(fitted).all()
    motion = np.abs(y[9] - y[0]).max()
    assert np.abs(fitted[:10] - y[:10]).max() < 0.05 * motion
    # The tail stays near the last valid position instead of extrapolating the motion.
    assert np.abs(fitted[10:] - y[9]).max() < 0.2 * motion
    # Only the anchor known: the trace holds still at the start.
    only_start = bs.fit(y_garbage, B, mask=np.zeros(32, bool))
    np.testing.assert_allclose(
        bs.evaluate(only_start, B), np.broadcast_to(y[0], (32, 3)), atol=1e-9
    )


def test_float_weights_and_batched_masks():
    B = bs.basis_matrix(bs.make_knots("uniform", 10), T32)
    y = np.stack([cubic(T32), 2 * cubic(T32)])  # [2, 32, 3]
    mask = np.ones((2, 32))
    mask[1, 20:] = 0.0
    ctrl = bs.fit(y, B, mask=mask, smoothing=0.0)
    assert ctrl.shape == (2, 10, 3)
    np.testing.assert_allclose(bs.evaluate(ctrl[0], B), y[0], atol=1e-6)
    # A uniform weight changes nothing when there is no penalty to trade against.
    np.testing.assert_allclose(
        bs.fit(y, B, mask=0.5 * np.ones(32), smoothing=0.0), bs.fit(y, B, smoothing=0.0), atol=1e-6
    )


@pytest.mark.parametrize("kind", KINDS)
def test_numpy_and_torch_agree_and_torch_is_differentiable(kind):
    spec = bs.SplineSpec(kind)
    rng = np.random.default_rng(1)
    y = rng.normal(size=(3, 5, 32, 3)).cumsum(-2) * 0.1
    mask = rng.random((3, 5, 32)) > 0.3
    ctrl_np = bs.fit(y, spec.basis(), mask=mask)
    y_t = torch.tensor(y, requires_grad=True)
    ctrl_t = bs.fit(y_t, spec.basis_torch(dtype=torch.float64), mask=torch.tensor(mask))
    np.testing.assert_allclose(ctrl_t.detach().numpy(), ctrl_np, atol=1e-5)
    out = bs.evaluate(ctrl_t, spec.basis())
    assert out.shape == (3, 5, 32, 3)
    out.square().sum().backward()
    assert torch.isfinite(y_t.grad).all() and y_t.grad.abs().sum() > 0
    np.testing.assert_allclose(out.detach().numpy(), bs.evaluate(ctrl_np, spec.basis()), atol=1e-5)


def test_spline_spec_basis_is_cached_and_read_only():
    spec = bs.SplineSpec("uniform")
    B = spec.basis()
    assert B.dtype == np.float32 and B.shape == (32, 10) and spec.basis() is B
    with pytest.raises(ValueError):
        B[0, 0] = 2.0
    np.testing.assert_allclose(spec.times[[0, -1]], [0.0, 1.0])
    assert spec.basis_torch().shape == (32, 10)
    # Control points at the Greville abscissae (knot averages) reproduce x(t) = t: slope 1.
    greville = np.array([spec.knots[i + 1 : i + 4].mean() for i in range(10)])[:, None]
    np.testing.assert_allclose(bs.evaluate(greville, spec.basis()), spec.times[:, None], atol=1e-6)
    np.testing.assert_allclose(bs.evaluate(greville, spec.basis(1)), 1.0, atol=1e-5)
