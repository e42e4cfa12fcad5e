"""Trace metrics against hand-computed values; masks must exclude invalid steps and points."""

import math

import numpy as np
import pytest
import torch

from mu0_core import geometry, metrics

W, H_IMG = 640, 480
INTR = torch.tensor(
    [[500.0, 500.0, 319.5, 239.5], [400.0, 420.0, 300.0, 200.0]], dtype=torch.float64
)
SIZE = torch.tensor([[W, H_IMG], [W, H_IMG]])


def gt_xyz(B=2, N=3, H=32):
    """[B, N, H, 3] camera-frame traces in front of the camera, moving a few cm."""
    t = torch.linspace(0, 1, H, dtype=torch.float64)
    start = torch.tensor([0.05, -0.02, 1.2], dtype=torch.float64)
    pts = start + torch.arange(N, dtype=torch.float64)[:, None, None] * 0.03  # [N, 1, 3]
    motion = torch.stack([0.1 * t, 0.05 * t**2, -0.2 * t], -1)  # [H, 3]
    return (pts + motion).expand(B, N, H, 3).clone()


def to_uvz(xyz):
    B = xyz.shape[0]
    return geometry.xyz_to_uvz(xyz, INTR[:B], SIZE[:B])


def test_constant_3d_offset_gives_ade_equal_fde():
    xyz = gt_xyz()
    valid = torch.ones(xyz.shape[:-1], dtype=torch.bool)
    for offset, depth_err in (
        (torch.tensor([0.01, 0.0, 0.0]), 0.0),
        (torch.tensor([0.0, 0.0, 0.01]), 0.01),
    ):
        m = metrics.trace_metrics(to_uvz(xyz + offset.double()), to_uvz(xyz), valid, INTR, SIZE)
        for h in (8, 16, 32):
            assert m[f"ade3d_m_h{h}"] == pytest.approx(0.01, abs=1e-9)
            assert m[f"fde3d_m_h{h}"] == pytest.approx(0.01, abs=1e-9)
            assert m[f"ade_depth_m_h{h}"] == pytest.approx(depth_err, abs=1e-9)
            assert m[f"num_points_h{h}"] == 6


def test_uv_and_pixel_errors_by_hand():
    gt = to_uvz(gt_xyz())
    pred = gt.clone()
    pred[..., 0] += 0.1  # 0.1 normalised = 0.1 * 640 / 2 = 32 px
    pred[..., 1] -= 0.05  # 0.05 * 480 / 2 = 12 px
    valid = torch.ones(gt.shape[:-1], dtype=torch.bool)
    m = metrics.trace_metrics(pred, gt, valid, INTR, SIZE, horizons=(32,))
    assert m["ade_uv_h32"] == pytest.approx(math.hypot(0.1, 0.05))
    assert m["fde_px_h32"] == pytest.approx(math.hypot(32, 12))
    assert m["ade_depth_m_h32"] == 0.0
    assert set(m) == {
        f"{a}_h32"
        for a in (
            "ade_uv",
            "fde_uv",
            "ade_px",
            "fde_px",
            "ade_depth_m",
            "fde_depth_m",
            "ade3d_m",
            "fde3d_m",
            "num_points",
        )
    }


def test_horizon_prefixes_and_fde_at_last_valid_step():
    gt = to_uvz(gt_xyz(B=1, N=2))
    pred = gt.clone()
    steps = torch.arange(32, dtype=torch.float64)
    pred[..., 2] += 0.001 * steps  # depth error grows by 1 mm per step
    valid = torch.ones(1, 2, 32, dtype=torch.bool)
    m = metrics.trace_metrics(pred, gt, valid, INTR[:1], SIZE[:1])
    assert m["ade_depth_m_h8"] == pytest.approx(0.001 * 3.5)  # mean of 0..7 mm
    assert m["fde_depth_m_h8"] == pytest.approx(0.007)
    assert m["fde_depth_m_h32"] == pytest.approx(0.031)
    # Point 1 becomes invalid after step 5 (its tail is garbage): its FDE is at step 5.
    valid[0, 1, 6:] = False
    pred[0, 1, 6:] = 99.0
    m = metrics.trace_metrics(pred, gt, valid, INTR[:1], SIZE[:1])
    assert m["fde_depth_m_h16"] == pytest.approx((0.015 + 0.005) / 2)
    assert m["ade_depth_m_h16"] == pytest.approx((0.0075 + 0.0025) / 2)
    assert math.isfinite(m["ade3d_m_h32"]) and math.isfinite(m["fde_px_h32"])


def test_masked_points_and_steps_are_excluded():
    gt = to_uvz(gt_xyz())
    pred = gt.clone()
    pred[0, 2] += 5.0  # a padded point with a wild prediction
    pred[1, 0, 10] += 5.0  # an invalid step
    valid = torch.ones(gt.shape[:-1], dtype=torch.bool)
    valid[1, 0, 10] = False
    point_mask = torch.ones(2, 3, dtype=torch.bool)
    point_mask[0, 2] = False
    m = metrics.trace_metrics(pred, gt, valid, INTR, SIZE, point_mask=point_mask)
    assert all(v == 0.0 for k, v in m.items() if not k.startswith("num_points"))
    assert m["num_points_h32"] == 5
    # No valid point at all: NaN, not a flattering 0.
    m = metrics.trace_metrics(pred, gt, torch.zeros_like(valid), INTR, SIZE)
    assert math.isnan(m["ade3d_m_h8"])


def test_trace_metrics_rejects_bad_shapes():
    gt = to_uvz(gt_xyz())
    valid = torch.ones(gt.shape[:-1], dtype=torch.bool)
    with pytest.raises(ValueError, match="horizons"):
        metrics.trace_metrics(gt, gt, valid, INTR, SIZE, horizons=(64,))
    with pytest.raises(ValueError, match="valid"):
        metrics.trace_metrics(gt, gt, valid[..., :8], INTR, SIZE)


def test_min_ade_k_picks_the_closer_sample_per_point():
    xyz = gt_xyz(B=1, N=2)
    gt = to_uvz(xyz)
    near = torch.tensor([0.002, 0.0, 0.0], dtype=torch.float64)
    far = torch.tensor([0.0, 0.05, 0.0], dtype=torch.float64)
    sample0 = xyz.clone()
    sample1 = xyz.clone()
    sample0[0, 0] += near  # sample 0 is right for point 0
    sample0[0, 1] += far
    sample1[0, 0] += far
    sample1[0, 1] += 2 * near  # sample 1 is right for point 1
    pred_k = torch.stack([to_uvz(sample0), to_uvz(sample1)])
    valid = torch.ones(1, 2, 32, dtype=torch.bool)
    assert metrics.min_ade_k(pred_k, gt, valid, INTR[:1], SIZE[:1]) == pytest.approx(0.003)
    # Any single sample is worse.
    assert metrics.trace_metrics(pred_k[0], gt, valid, INTR[:1], SIZE[:1])["ade3d_m_h32"] > 0.02


def naive_dp(a, b, combine):
    T, S = len(a), len(b)
    R = np.full((T + 1, S + 1), np.inf)
    R[0, 0] = 0.0
    for i in range(1, T + 1):
        for j in range(1, S + 1):
            c = np.linalg.norm(a[i - 1] - b[j - 1])
            R[i, j] = combine(c, min(R[i - 1, j - 1], R[i - 1, j], R[i, j - 1]))
    return R[T, S]


def test_dtw_and_frechet_known_3x3():
    # cost |a_i - b_j| = [[0, 2, 3], [1, 1, 2], [2, 0, 1]]; cheapest path (0,0) (1,1) (2,1) (2,2)
    # costs 0 + 1 + 0 + 1 = 2; the smallest worst step along a path is 1.
    a, b = np.array([[0.0], [1.0], [2.0]]), np.array([[0.0], [2.0], [3.0]])
    assert metrics.dtw_distance(a, b) == pytest.approx(2.0)
    assert metrics.discrete_frechet(a, b) == pytest.approx(1.0)


def test_dtw_ignores_a_repeated_sample_and_frechet_of_parallel_segments():
    a = np.stack([np.linspace(0, 1, 5), np.zeros(5)], -1)
    repeated = np.insert(a, 2, a[2], axis=0)
    assert metrics.dtw_distance(a, repeated) == 0.0
    assert metrics.discrete_frechet(a, repeated) == 0.0
    shifted = a + [0.0, 0.3]
    assert metrics.discrete_frechet(a, shifted) == pytest.approx(0.3)
    assert metrics.dtw_distance(a, shifted) == pytest.approx(5 * 0.3)


def test_vectorised_dp_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    for T, S in ((1, 1), (4, 9), (9, 4), (7, 7)):
        a, b = rng.normal(size=(T, 3)), rng.normal(size=(S, 3))
        assert metrics.dtw_distance(a, b) == pytest.approx(naive_dp(a, b, lambda c, m: c + m))
        assert metrics.discrete_frechet(a, b) == pytest.approx(naive_dp(a, b, max))
    with pytest.raises(ValueError):
        metrics.dtw_distance(np.zeros((3, 2)), np.zeros((3, 3)))


def test_batched_dtw_and_frechet_respect_masks():
    xyz = gt_xyz()
    gt = to_uvz(xyz)
    valid = torch.ones(gt.shape[:-1], dtype=torch.bool)
    pred = to_uvz(xyz + torch.tensor([0.0, 0.01, 0.0], dtype=torch.float64))
    assert metrics.mean_frechet_3d(pred, gt, valid, INTR, SIZE) == pytest.approx(0.01)
    assert metrics.mean_dtw_3d(pred, gt, valid, INTR, SIZE) == pytest.approx(32 * 0.01)
    # Garbage at invalid steps and on a masked point changes nothing; each point is compared
    # over its own valid steps (here point (0, 0) has 10 of them).
    pred2 = to_uvz(xyz.clone())
    valid[0, 0, 10:] = False
    pred2[0, 0, 10:] = 50.0
    point_mask = torch.ones(2, 3, dtype=torch.bool)
    point_mask[1, 1] = False
    pred2[1, 1] = -3.0
    assert metrics.mean_dtw_3d(pred2, gt, valid, INTR, SIZE, point_mask) == pytest.approx(
        0.0, abs=1e-12
    )
    assert metrics.mean_frechet_3d(pred2, gt, valid, INTR, SIZE, point_mask) == pytest.approx(
        0.0, abs=1e-12
    )
    # Per point over its valid steps only: a pair with 10 valid steps is a 10 x 10 problem.
    one = metrics.mean_dtw_3d(pred[:1, :1], gt[:1, :1], valid[:1, :1], INTR[:1], SIZE[:1])
    assert one == pytest.approx(10 * 0.01)


def test_smoothness_by_hand():
    steps = torch.arange(10, dtype=torch.float64)
    quadratic = torch.stack([steps**2, torch.zeros(10)], -1)  # second difference 2, third 0
    s = metrics.smoothness(quadratic)
    assert s["accel"] == pytest.approx(2.0) and s["jerk"] == pytest.approx(0.0)
    cubic = torch.stack([steps**3, torch.zeros(10)], -1)[None]  # third difference 6
    assert metrics.smoothness(cubic)["jerk"] == pytest.approx(6.0)
    # A spike on an invalid step does not count; a line plus a spike elsewhere would.
    line = torch.stack([steps, steps], -1)
    line[7] += 100.0
    valid = torch.ones(10, dtype=torch.bool)
    valid[7] = False
    s = metrics.smoothness(line, valid)
    assert s["accel"] == pytest.approx(0.0) and s["jerk"] == pytest.approx(0.0)
    assert metrics.smoothness(line)["jerk"] > 10
    assert math.isnan(metrics.smoothness(line[:3])["jerk"])


def test_moving_points_and_their_own_metrics_in_evaluate():
    """Point 0 moves 20+ cm, point 1 stays put, point 2 is padding: only point 0 counts as
    moving, and the static baseline's moving-point ADE is that point's error alone."""
    from mu0_core.evaluate import Predictor, evaluate, moving_points
    from mu0_core.types import TraceBatch

    xyz = gt_xyz(B=2, N=3)
    xyz[:, 1] = xyz[:, 1, :1]  # point 1 never leaves where it starts
    future = to_uvz(xyz).float()
    hist = future[:, :, :1].expand(2, 3, 8, 3).clone()  # current position = future step 0
    batch = TraceBatch(
        hist_uvz=hist,
        hist_valid=torch.ones(2, 3, 8, dtype=torch.bool),
        future_uvz=future,
        future_valid=torch.ones(2, 3, 32, dtype=torch.bool),
        point_mask=torch.tensor([[True, True, False]] * 2),
        intrinsics=INTR.float(),
        image_size=SIZE,
        instructions=["x", "x"],
    )
    moving = moving_points(batch)
    assert moving.tolist() == [[True, False, False]] * 2
    res = evaluate([Predictor("static", kind="static")], lambda: [batch])["static"]
    assert res["moving_share"] == pytest.approx(0.5)
    # Static error of point 0 alone: its distance from the start, averaged over the steps.
    err0 = (xyz[0, 0] - xyz[0, 0, :1]).norm(dim=-1)
    assert res["moving_ade3d_m_h32"] == pytest.approx(float(err0.mean()), rel=1e-4)
    assert res["moving_fde3d_m_h32"] == pytest.approx(float(err0[-1]), rel=1e-4)
    # Over all points the still one halves it.
    assert res["ade3d_m_h32"] == pytest.approx(float(err0.mean()) / 2, rel=1e-4)


def test_evaluate_scores_against_the_truth_and_the_labels_beside_it():
    """With the simulator's truth in the batch, unprefixed figures are against it and
    ``label_*`` against the extracted labels; the "labels" row is the labels scored against
    the truth on the steps they exist."""
    from mu0_core.evaluate import Predictor, evaluate
    from mu0_core.types import TraceBatch

    xyz = gt_xyz(B=2, N=3)
    truth = to_uvz(xyz).float()
    # Labels: the truth 1 cm off along x, and lost from step 16 on.
    label_xyz = xyz.clone()
    label_xyz[:, :, 1:, 0] += 0.01
    labels = to_uvz(label_xyz).float()
    label_valid = torch.ones(2, 3, 32, dtype=torch.bool)
    label_valid[..., 16:] = False
    hist = truth[:, :, :1].expand(2, 3, 8, 3).clone()
    batch = TraceBatch(
        hist_uvz=hist,
        hist_valid=torch.ones(2, 3, 8, dtype=torch.bool),
        future_uvz=labels,
        future_valid=label_valid,
        point_mask=torch.ones(2, 3, dtype=torch.bool),
        intrinsics=INTR.float(),
        image_size=SIZE,
        instructions=["x", "x"],
        gt_future_uvz=truth,
        gt_future_valid=torch.ones(2, 3, 32, dtype=torch.bool),
        gt_part=torch.tensor([[2, 3, 0]] * 2),  # gripper, object, scene
    )
    res = evaluate(
        [Predictor("static", kind="static"), Predictor("labels", kind="labels")], lambda: [batch]
    )
    static_err = (xyz - xyz[:, :, :1]).norm(dim=-1)  # [B, N, 32] against the truth
    assert res["static"]["ade3d_m_h32"] == pytest.approx(float(static_err.mean()), rel=1e-3)
    label_err = (label_xyz - xyz[:, :, :1]).norm(dim=-1)[..., :16]  # against the labels
    assert res["static"]["label_ade3d_m_h32"] == pytest.approx(float(label_err.mean()), rel=1e-3)
    # The labels are 1 cm from the truth on steps 1-15 (0 at step 0) where they exist.
    assert res["labels"]["ade3d_m_h32"] == pytest.approx(0.01 * 15 / 16, rel=1e-3)
    assert res["labels"]["fde3d_m_h32"] == pytest.approx(0.01, rel=1e-3)
    assert res["static"]["scored_against_truth"] == 1.0
    # By part: point 0 is on the gripper, point 1 on an object.
    per_point = static_err.mean(-1)  # [B, N]
    assert res["static"]["gripper_moving_ade3d_m_h32"] == pytest.approx(
        float(per_point[:, 0].mean()), rel=1e-3
    )
    true_end = static_err[:, 0, -1]
    assert res["static"]["gripper_true_end_disp_m_median"] == pytest.approx(
        float(true_end.median()), rel=1e-3
    )
    assert res["static"]["gripper_pred_end_disp_m_median"] == pytest.approx(0.0, abs=1e-6)
