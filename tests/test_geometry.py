"""Geometry: pixel/uv conventions, projection, rigid transforms, in numpy and torch."""

import json
import math

import numpy as np
import pytest
import torch

from mu0_core import geometry as g

KINDS = ["numpy", "torch"]


def as_kind(x, kind):
    return torch.as_tensor(np.asarray(x), dtype=torch.float64) if kind == "torch" else np.asarray(x)


def to_np(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def random_rotations(rng, n):
    axis = rng.normal(size=(n, 3))
    angle = rng.uniform(-math.pi, math.pi, size=n)
    return g.rotation_from_axis_angle(axis, angle)


# --- Intrinsics ----------------------------------------------------------------------


def test_intrinsics_K_roundtrip_and_json():
    intr = g.Intrinsics(fx=500, fy=510, cx=319.5, cy=239.5, width=640, height=480)
    assert g.Intrinsics.from_K(intr.K, 640, 480) == intr
    assert g.Intrinsics.from_dict(json.loads(json.dumps(intr.to_dict()))) == intr
    arr = intr.as_array()
    assert arr.dtype == np.float32 and arr.tolist() == [500, 510, 319.5, 239.5]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(fx=0, fy=500, cx=1, cy=1, width=640, height=480),
        dict(fx=500, fy=-1, cx=1, cy=1, width=640, height=480),
        dict(fx=500, fy=500, cx=1, cy=1, width=0, height=480),
        dict(fx=500, fy=500, cx=1, cy=1, width=640, height=-4),
        dict(fx=500, fy=500, cx=1, cy=1, width=640.5, height=480),
        dict(fx=float("nan"), fy=500, cx=1, cy=1, width=640, height=480),
    ],
)
def test_intrinsics_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        g.Intrinsics(**kwargs)


def test_intrinsics_from_K_and_dict_errors():
    with pytest.raises(ValueError, match="3x3"):
        g.Intrinsics.from_K(np.eye(4), 640, 480)
    K = np.array([[500, 2.0, 320], [0, 500, 240], [0, 0, 1]])
    with pytest.raises(ValueError, match="skew"):
        g.Intrinsics.from_K(K, 640, 480)
    with pytest.raises(ValueError, match="missing keys"):
        g.Intrinsics.from_dict({"fx": 1.0})


def test_intrinsics_scaled_keeps_projection_consistent():
    intr = g.Intrinsics(fx=600, fy=600, cx=319.5, cy=239.5, width=640, height=480)
    small = intr.scaled(224, 168)
    xyz = np.array([[0.13, -0.07, 1.3], [-0.4, 0.2, 2.5]])
    uv_big, _ = g.project(xyz, intr.fx, intr.fy, intr.cx, intr.cy)
    uv_small, _ = g.project(xyz, small.fx, small.fy, small.cx, small.cy)
    # Normalised uv is resolution independent, so both images agree on where the point is.
    np.testing.assert_allclose(
        g.pixels_to_uv(uv_big, 640, 480), g.pixels_to_uv(uv_small, 224, 168), atol=1e-12
    )
    # The principal point at the image centre stays at the centre.
    assert small.cx == pytest.approx((224 - 1) / 2) and small.cy == pytest.approx((168 - 1) / 2)


# --- pixels <-> uv ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_pixel_edges_map_to_plus_minus_one(kind):
    W, H = 640, 480
    # The outer edges of the image are half a pixel outside the first and last centres.
    edges_px = as_kind([[-0.5, -0.5], [W - 0.5, H - 0.5], [(W - 1) / 2, (H - 1) / 2]], kind)
    uv = to_np(g.pixels_to_uv(edges_px, W, H))
    np.testing.assert_allclose(uv, [[-1, -1], [1, 1], [0, 0]], atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_pixels_uv_roundtrip_with_per_frame_sizes(kind):
    rng = np.random.default_rng(0)
    uv_px = as_kind(rng.uniform(0, 500, size=(2, 5, 7, 2)), kind)
    width, height = as_kind([640.0, 320.0], kind), as_kind([480.0, 240.0], kind)
    uv = g.pixels_to_uv(uv_px, width, height)
    assert type(uv) is type(uv_px) and tuple(uv.shape) == (2, 5, 7, 2)
    np.testing.assert_allclose(to_np(g.uv_to_pixels(uv, width, height)), to_np(uv_px), atol=1e-9)
    # Frame 1 used its own size: pixel 0 of a 320-wide image is at -1 + 1/320.
    one = g.pixels_to_uv(as_kind(np.zeros((2, 1, 2)), kind), width, height)
    np.testing.assert_allclose(to_np(one)[1, 0], [-1 + 1 / 320, -1 + 1 / 240])


def test_per_frame_parameter_with_too_many_dims_raises():
    with pytest.raises(ValueError, match="leading dims"):
        g.pixels_to_uv(np.zeros((3, 2)), np.ones((3, 4)), 1.0)
    with pytest.raises(ValueError, match="leading dims"):  # intrinsics of another batch
        g.uvz_to_xyz(np.ones((1, 5, 3)), np.ones((2, 4)), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        g.pixels_to_uv(np.zeros((3, 3)), 640, 480)


# --- projection ------------------------------------------------------------------------


def test_known_projection_by_hand():
    # u = fx * x / z + cx = 500 * 0.1 / 2 + 319.5 = 344.5; v = 500 * -0.05 / 2 + 239.5 = 227.0
    uv_px, z = g.project(np.array([0.1, -0.05, 2.0]), 500.0, 500.0, 319.5, 239.5)
    np.testing.assert_allclose(uv_px, [344.5, 227.0])
    assert z == 2.0
    # ... and its normalised uv: (2 * 344.5 + 1) / 640 - 1 = 0.078125, (2 * 227 + 1) / 480 - 1
    uvz = g.xyz_to_uvz(np.array([0.1, -0.05, 2.0]), [500, 500, 319.5, 239.5], [640, 480])
    np.testing.assert_allclose(uvz, [0.078125, 455 / 480 - 1, 2.0])


@pytest.mark.parametrize("kind", KINDS)
def test_unproject_project_roundtrip(kind):
    rng = np.random.default_rng(1)
    uv_px = as_kind(rng.uniform(0, 640, size=(4, 9, 2)), kind)
    depth = as_kind(rng.uniform(0.2, 3.0, size=(4, 9)), kind)
    xyz = g.unproject(uv_px, depth, 600.0, 610.0, 320.0, 240.0)
    assert tuple(xyz.shape) == (4, 9, 3)
    uv_back, z_back = g.project(xyz, 600.0, 610.0, 320.0, 240.0)
    np.testing.assert_allclose(to_np(uv_back), to_np(uv_px), atol=1e-9)
    np.testing.assert_allclose(to_np(z_back), to_np(depth), atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_uvz_xyz_roundtrip_batch_first_intrinsics(kind):
    rng = np.random.default_rng(2)
    B, N, H = 3, 4, 5
    uvz = np.concatenate(
        [rng.uniform(-1, 1, size=(B, N, H, 2)), rng.uniform(0.3, 2, size=(B, N, H, 1))], -1
    )
    intrinsics = np.array([[500, 500, 319.5, 239.5], [300, 310, 100, 90], [900, 880, 640, 360]])
    image_size = np.array([[640, 480], [200, 180], [1280, 720]])
    xyz = g.uvz_to_xyz(as_kind(uvz, kind), as_kind(intrinsics, kind), as_kind(image_size, kind))
    back = g.xyz_to_uvz(xyz, intrinsics, image_size)
    assert type(back) is type(xyz) and tuple(back.shape) == (B, N, H, 3)
    np.testing.assert_allclose(to_np(back), uvz, atol=1e-9)
    # Each frame used its own camera: frame 1 against a direct computation.
    u_px = ((uvz[1, ..., 0] + 1) * 200 - 1) / 2
    np.testing.assert_allclose(to_np(xyz)[1, ..., 0], (u_px - 100) / 300 * uvz[1, ..., 2])


def test_torch_keeps_dtype_and_gradients():
    uvz = torch.tensor([[0.1, -0.2, 1.5]], dtype=torch.float32, requires_grad=True)
    xyz = g.uvz_to_xyz(uvz, np.array([500, 500, 319.5, 239.5]), np.array([640, 480]))
    assert xyz.dtype == torch.float32
    xyz.sum().backward()
    assert uvz.grad is not None and torch.isfinite(uvz.grad).all()
    # x = ((u+1) W - 1)/2 - cx) / fx * z, so dx/dz = x / z.
    assert uvz.grad[0, 2].item() == pytest.approx((xyz[0, 0] + xyz[0, 1] + xyz[0, 2]).item() / 1.5)


# --- rigid transforms ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_transform_inverse_is_identity(kind):
    rng = np.random.default_rng(3)
    R = as_kind(random_rotations(rng, 6), kind)
    t = as_kind(rng.normal(size=(6, 3)), kind)
    T_a_b = g.make_transform(R, t)
    assert tuple(T_a_b.shape) == (6, 4, 4)
    np.testing.assert_allclose(
        to_np(T_a_b @ g.invert_transform(T_a_b)), np.broadcast_to(np.eye(4), (6, 4, 4)), atol=1e-12
    )
    p_b = as_kind(rng.normal(size=(6, 10, 3)), kind)  # T [B, 4, 4] with points [B, N, 3]
    p_a = g.transform_points(T_a_b, p_b)
    np.testing.assert_allclose(
        to_np(g.transform_points(g.invert_transform(T_a_b), p_a)), to_np(p_b), atol=1e-12
    )


def test_transform_direction_by_hand():
    # Camera 1 m above the base, looking down: camera z (forward) = base -z.
    R_base_cam = np.array([[1.0, 0, 0], [0, -1, 0], [0, 0, -1]])
    T_base_cam = g.make_transform(R_base_cam, [0.0, 0.0, 1.0])
    point_cam = np.array([0.1, 0.2, 0.9])  # 0.9 m in front of the camera
    np.testing.assert_allclose(g.transform_points(T_base_cam, point_cam), [0.1, -0.2, 0.1])


@pytest.mark.parametrize("kind", KINDS)
def test_rotation_from_axis_angle_and_angle(kind):
    angles = np.array([0.0, 1e-4, 0.3, 2.0, math.pi])
    R = g.rotation_from_axis_angle(as_kind([[0.0, 0.0, 2.0]] * 5, kind), as_kind(angles, kind))
    np.testing.assert_allclose(
        to_np(R)[2],
        [[math.cos(0.3), -math.sin(0.3), 0], [math.sin(0.3), math.cos(0.3), 0], [0, 0, 1]],
        atol=1e-12,
    )
    np.testing.assert_allclose(to_np(g.rotation_angle_deg(R)), np.rad2deg(angles), atol=1e-9)
    # The error between two rotations is the angle of R_est @ R_true^T.
    rng = np.random.default_rng(4)
    R_true = random_rotations(rng, 1)[0]
    R_est = g.rotation_from_axis_angle(rng.normal(size=3), math.radians(1.5)) @ R_true
    assert g.rotation_angle_deg(R_est @ R_true.T) == pytest.approx(1.5)


def test_transform_errors():
    with pytest.raises(ValueError):
        g.make_transform(np.eye(4), np.zeros(3))
    with pytest.raises(ValueError):
        g.invert_transform(np.eye(3))
    with pytest.raises(ValueError, match="non-zero"):
        g.rotation_from_axis_angle(np.zeros(3), 1.0)
    with pytest.raises(ValueError, match="does not match"):
        g.transform_points(np.broadcast_to(np.eye(4), (2, 3, 4, 4)), np.zeros((2, 3)))
