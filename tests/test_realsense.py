"""RealSense cameras without hardware: the SDK's software device and recorded-file playback.

Frames go through the real SDK (syncer, alignment, depth units, playback); the checks are
on values: depth in metres in each model's unit, intrinsics from the device, depth
shifted by alignment as the extrinsics say, frames in order from a recording.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from envs.realsense import (
    CameraGroup,
    DepthToColor,
    EndOfRecording,
    RealSenseCamera,
    RealSenseConfig,
    SoftwareRealSense,
    clocks_now,
    find_realsense,
    write_recording,
)

rs = pytest.importorskip("pyrealsense2")

W, H = 96, 72


def _frame(i: int, depth_m: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = i  # the frame's index, to check order
    rgb[..., 1] = 255 - i
    return rgb, np.full((H, W), depth_m, np.float32)


def _push_and_read(sw, cam, rgb, depth, timestamp_ms=None, attempts=30):
    """Stream one picture at the device's rate until it comes out of the camera.

    As from a real device, frames must keep coming: the SDK's syncer hands a depth or
    colour frame over alone when its partner's stream looks stalled (the first frames).
    """
    first = None
    for k in range(attempts):
        stamp = None if timestamp_ms is None else timestamp_ms + k * 1e3 / sw.fps
        number = sw.push(rgb, depth, timestamp_ms=stamp)
        first = number if first is None else first
        try:
            frame = cam.read(timeout_s=1.0 / sw.fps)
        except TimeoutError:
            continue
        if frame.frame_number >= first:
            return frame
    raise AssertionError("no frame came through the software device")


def test_import_needs_no_sdk_and_missing_sdk_names_extra():
    code = (
        "import sys; sys.modules['pyrealsense2'] = None\n"
        "import envs.realsense as r\n"
        "try:\n    r.RealSenseCamera().connect()\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'mu0[real]'" in out.stdout


def test_no_devices_here_is_an_empty_list():
    # CI machines have no camera; a real machine lists what is plugged in.
    assert isinstance(find_realsense(), list)


@pytest.mark.parametrize(("model", "unit"), [("D405", 1e-4), ("D435", 1e-3)])
def test_depth_in_metres_in_the_models_own_unit(model, unit):
    sw = SoftwareRealSense(serial=f"SW-{model}", model=model, width=W, height=H)
    with RealSenseCamera(RealSenseConfig(width=W, height=H), device=sw) as cam:
        assert cam.serial == f"SW-{model}"
        assert cam.depth_scale == pytest.approx(unit, rel=1e-5)
        frame = _push_and_read(sw, cam, *_frame(1, depth_m=0.51234))
    valid = frame.depth_m[frame.depth_m > 0]
    assert valid.size > 0.8 * frame.depth_m.size
    # Quantised by the device's unit: 0.5123 m on a D405, 0.512 m on a D435.
    expected = np.round(0.51234 / unit) * unit
    assert np.median(valid) == pytest.approx(expected, abs=1e-6)
    assert frame.depth_scale == pytest.approx(unit, rel=1e-5)


def test_intrinsics_come_from_the_device():
    sw = SoftwareRealSense(serial="SW1", width=W, height=H, intrinsics=(81.0, 82.0, 47.0, 35.5))
    with RealSenseCamera(RealSenseConfig(width=W, height=H), device=sw) as cam:
        np.testing.assert_allclose(cam.intrinsics, [81.0, 82.0, 47.0, 35.5])
        assert cam.image_size == (W, H)
        frame = _push_and_read(sw, cam, *_frame(3))
    np.testing.assert_allclose(frame.intrinsics, [81.0, 82.0, 47.0, 35.5])
    np.testing.assert_array_equal(frame.rgb[0, 0], [3, 252, 0])


def test_depth_is_aligned_to_colour():
    # Depth sensor 5 cm to the side of the colour sensor: a depth edge at column 48 must
    # land f * 0.05 / z pixels over in the colour image (10 px at f = 100, z = 0.5).
    f, z, tx = 100.0, 0.5, 0.05
    sw = SoftwareRealSense(
        serial="SW1",
        width=W,
        height=H,
        intrinsics=(f, f, (W - 1) / 2, (H - 1) / 2),
        depth_to_color_m=(tx, 0.0, 0.0),
    )
    depth = np.zeros((H, W), np.float32)
    depth[:, 48:] = z  # left half: no measurement
    with RealSenseCamera(RealSenseConfig(width=W, height=H), device=sw) as cam:
        frame = _push_and_read(sw, cam, _frame(0)[0], depth)
    row = frame.depth_m[H // 2]
    first_valid = int(np.argmax(row > 0))
    assert abs(first_valid - (48 + f * tx / z)) <= 1.0
    assert np.median(row[row > 0]) == pytest.approx(z, abs=1e-3)


def test_calibration_reads_intrinsics_from_the_device():
    from calibration.intrinsics import intrinsics_of

    sw = SoftwareRealSense(
        serial="SW9", model="D405", width=W, height=H, intrinsics=(70, 71, 48, 36)
    )
    cam = RealSenseCamera(RealSenseConfig(width=W, height=H), device=sw)
    with pytest.raises(RuntimeError, match="connect the camera first"):
        intrinsics_of(cam)
    with cam:
        intr = intrinsics_of(cam)
    assert (intr.serial, intr.width, intr.height) == ("SW9", W, H)
    np.testing.assert_allclose(intr.K, [[70, 0, 48], [0, 71, 36], [0, 0, 1]])
    assert intr.depth_scale == pytest.approx(1e-4, rel=1e-5) and intr.distortion_model == "none"


def test_capture_and_receive_times():
    sw = SoftwareRealSense(serial="SW1", width=W, height=H)
    with RealSenseCamera(RealSenseConfig(width=W, height=H), device=sw) as cam:
        # Stamped 200 ms before it is pushed: the frame must look at least that old.
        stamp = time.time() * 1e3 - 200.0
        frame = _push_and_read(sw, cam, *_frame(1), timestamp_ms=stamp)
    assert frame.timestamp_domain == "system_time"
    assert frame.timestamp_ms == pytest.approx(stamp)
    assert frame.received_at >= frame.captured_at
    assert frame.latency_s >= 0.2


def test_background_reader_latest_and_read():
    sw = SoftwareRealSense(serial="SW1", width=W, height=H)
    cam = RealSenseCamera(RealSenseConfig(width=W, height=H), device=sw)
    assert cam.latest() is None
    with pytest.raises(RuntimeError, match="not connected"):
        cam.read()
    cam.connect()
    try:
        first = _push_and_read(sw, cam, *_frame(1))
        # read() never hands the same frame twice: nothing new -> timeout.
        with pytest.raises(TimeoutError):
            cam.read(timeout_s=0.05)
        assert cam.latest() is first
        second = _push_and_read(sw, cam, *_frame(2))
        assert second.frame_number > first.frame_number
        assert cam.latest().frame_number == second.frame_number
        assert cam.latest(max_age_s=0.0) is None  # older than a zero budget
    finally:
        cam.disconnect()
    assert not cam.is_connected
    cam.disconnect()  # twice is fine
    with pytest.raises(RuntimeError, match="not connected"):
        cam.read()


def test_wrong_serial_is_refused():
    sw = SoftwareRealSense(serial="SW1", width=W, height=H)
    cam = RealSenseCamera(RealSenseConfig(serial="OTHER", width=W, height=H), device=sw)
    with pytest.raises(ValueError, match="expected camera serial OTHER"):
        cam.connect()
    assert not cam.is_connected


def test_two_cameras_by_serial():
    a = SoftwareRealSense(serial="CAM-A", model="D435", width=W, height=H)
    b = SoftwareRealSense(serial="CAM-B", model="D405", width=W, height=H)
    cams = [RealSenseCamera(RealSenseConfig(width=W, height=H), device=d) for d in (a, b)]
    with CameraGroup(cams) as group:
        fa = _push_and_read(a, cams[0], *_frame(10, depth_m=0.6))
        fb = _push_and_read(b, cams[1], *_frame(20, depth_m=0.9))
        assert {c.serial for c in group.cameras} == {"CAM-A", "CAM-B"}
    assert fa.serial == "CAM-A" and fb.serial == "CAM-B"
    assert fa.rgb[0, 0, 0] == 10 and fb.rgb[0, 0, 0] == 20
    assert np.median(fa.depth_m[fa.depth_m > 0]) == pytest.approx(0.6, abs=1e-3)
    assert np.median(fb.depth_m[fb.depth_m > 0]) == pytest.approx(0.9, abs=1e-4)


def test_recording_plays_back_like_the_camera(tmp_path):
    path = tmp_path / "stream.db3"
    frames = [_frame(i, depth_m=0.3 + 0.01 * i) for i in range(8)]
    n = write_recording(
        path,
        frames,
        width=W,
        height=H,
        intrinsics=(90.0, 90.0, 47.5, 35.5),
        model="D405",
        serial="REC-1",
    )
    assert n == 8 and path.stat().st_size > 0
    cam = RealSenseCamera(RealSenseConfig(recording=str(path), real_time=False))
    with cam:
        assert cam.serial == "REC-1"
        assert cam.depth_scale == pytest.approx(1e-4, rel=1e-5)
        np.testing.assert_allclose(cam.intrinsics, [90.0, 90.0, 47.5, 35.5])
        got = []
        with pytest.raises(EndOfRecording):
            for _ in range(20):
                got.append(cam.read(timeout_s=5.0))
    indices = [int(f.rgb[0, 0, 0]) for f in got]
    # Every frame after the first (which the SDK's syncer hands over unpaired), in order.
    assert indices == sorted(indices) and len(indices) >= 7 and indices[-1] == 7
    for f in got:
        i = int(f.rgb[0, 0, 0])
        assert np.median(f.depth_m[f.depth_m > 0]) == pytest.approx(0.3 + 0.01 * i, abs=2e-4)
        assert f.received_at >= f.captured_at


def test_missing_recording_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no RealSense recording"):
        RealSenseCamera(RealSenseConfig(recording=str(tmp_path / "nope.bag"))).connect()


def test_capture_times_stay_true_under_a_processing_stall():
    """Capture times come from the device stamp and both host clocks read together when a
    frame arrives: a 40 ms stall in processing (every odd frame) must neither age a frame
    nor send capture times backwards."""

    class StallingCamera(RealSenseCamera):
        def _aligned_depth_m(self, frames):
            out = super()._aligned_depth_m(frames)
            if frames.get_color_frame().get_frame_number() % 2:
                time.sleep(0.04)
            return out

    sw = SoftwareRealSense(serial="SW1", width=W, height=H)
    pushed_mono = {}
    got = {}
    with StallingCamera(RealSenseConfig(width=W, height=H), device=sw) as cam:
        for _ in range(40):
            mono, wall = clocks_now()
            pushed_mono[sw.push(*_frame(1), timestamp_ms=wall * 1e3)] = mono
            time.sleep(1.0 / sw.fps)
            frame = cam.latest()
            if frame is not None:
                got[frame.frame_number] = frame
        time.sleep(0.2)
        frame = cam.latest()
        got[frame.frame_number] = frame
    frames = [got[k] for k in sorted(got)]
    assert len(frames) >= 15
    captured = np.array([f.captured_at for f in frames])
    assert np.all(np.diff(captured) > 0)
    # Within 2 ms of when the frame was stamped, stall or not.
    errors_ms = [(f.captured_at - pushed_mono[f.frame_number]) * 1e3 for f in frames]
    assert max(abs(e) for e in errors_ms) < 2.0, errors_ms
    assert all(f.received_at >= f.captured_at for f in frames)


def _plane(K, size_wh, tilt_deg, t=(0.0, 0.0, 0.0), z0=0.5):
    """Depth (z, metres) of the plane n·P = d through (0, 0, z0) of the depth camera,
    tilted ``tilt_deg`` about y, seen by a camera whose frame is the depth camera's
    shifted by ``t`` (P_cam = P_depth + t); and (n, d) in that camera's frame."""
    fx, fy, cx, cy = K
    Wi, Hi = size_wh
    a = np.deg2rad(tilt_deg)
    n = np.array([np.sin(a), 0.0, np.cos(a)])
    d = n @ np.array([0.0, 0.0, z0]) + n @ np.asarray(t)
    xs, ys = np.meshgrid((np.arange(Wi) - cx) / fx, (np.arange(Hi) - cy) / fy)
    return d / (n[0] * xs + n[1] * ys + n[2]), n, d


@pytest.mark.parametrize("tilt_deg", [0.0, 30.0])
@pytest.mark.parametrize("color_scale", [2.0, 0.5])
def test_alignment_keeps_planes_flat_and_holes_empty(tilt_deg, color_scale):
    """Depth and colour 15 mm apart, colour at 2x or 0.5x the depth resolution, a flat or
    30° plane with isolated holes: every aligned pixel deprojects within 1 mm of the plane,
    valid depth stays valid and holes stay holes. rs.align on the same frames is measured
    alongside (it blanks rows and columns and fills holes: printed with -s)."""
    Wd, Hd = 96, 72
    Kd = (86.4, 86.4, 47.5, 35.5)
    Wc, Hc = int(Wd * color_scale), int(Hd * color_scale)
    # Principal points off the half-pixel grid, so no colour pixel maps exactly half way
    # between two depth pixels (where "the nearest" would be a coin toss).
    Kc = (Kd[0] * color_scale, Kd[1] * color_scale, (Wc - 1) / 2 + 0.1, (Hc - 1) / 2 + 0.1)
    baseline = (0.015, 0.0, 0.0)  # depth -> colour, metres
    depth, _, _ = _plane(Kd, (Wd, Hd), tilt_deg)
    rng = np.random.default_rng(0)
    holes = np.zeros((Hd, Wd), bool)
    grid = np.zeros((Hd, Wd), bool)
    grid[4:-4:4, 4:-4:4] = True  # isolated: never two side by side
    holes[grid & (rng.random((Hd, Wd)) < 0.5)] = True
    depth = np.where(holes, 0.0, depth).astype(np.float32)
    # The truth in the colour image: each colour ray meets the plane at a point whose
    # nearest depth pixel says whether the camera measured it.
    z_true, n, d = _plane(Kc, (Wc, Hc), tilt_deg, t=baseline)
    xs, ys = np.meshgrid((np.arange(Wc) - Kc[2]) / Kc[0], (np.arange(Hc) - Kc[3]) / Kc[1])
    P = np.stack([xs * z_true, ys * z_true, z_true], -1) - np.array(baseline)
    ud = np.rint(Kd[0] * P[..., 0] / P[..., 2] + Kd[2]).astype(int)
    vd = np.rint(Kd[1] * P[..., 1] / P[..., 2] + Kd[3]).astype(int)
    inside = (ud >= 0) & (ud < Wd) & (vd >= 0) & (vd < Hd)
    expect_valid = inside & ~holes[np.clip(vd, 0, Hd - 1), np.clip(ud, 0, Wd - 1)]
    expect_hole = inside & ~expect_valid

    figures = {}
    for align in ("sdk", "mu0"):
        sw = SoftwareRealSense(
            serial="SW1",
            model="D405",
            width=Wd,
            height=Hd,
            intrinsics=Kd,
            color_size=(Wc, Hc),
            color_intrinsics=Kc,
            depth_to_color_m=baseline,
        )
        rgb = np.zeros((Hc, Wc, 3), np.uint8)
        with RealSenseCamera(RealSenseConfig(width=Wd, height=Hd, align=align), device=sw) as cam:
            frame = _push_and_read(sw, cam, rgb, depth)
        z = frame.depth_m.astype(np.float64)
        assert z.shape == (Hc, Wc)
        got = z > 0
        Pc = np.stack([xs * z, ys * z, z], -1)
        off_mm = np.abs(Pc[got] @ n - d) * 1e3
        figures[align] = {
            "valid_lost_pct": 100 * float((expect_valid & ~got).sum() / expect_valid.sum()),
            "holes_filled_pct": 100 * float((expect_hole & got).sum() / expect_hole.sum()),
            "max_off_plane_mm": float(off_mm.max()),
        }
    print(f"\ntilt {tilt_deg:.0f}°, colour {color_scale}x depth: {figures}")
    ours = figures["mu0"]
    assert ours["max_off_plane_mm"] <= 1.0
    assert ours["holes_filled_pct"] == 0.0
    assert ours["valid_lost_pct"] <= 0.5  # rounding at the image's edge


@pytest.mark.parametrize("near_side", ["left", "right"])
def test_alignment_at_an_occluding_edge(near_side):
    """A board 0.25 m away covering half the depth image, a wall at 2 m behind: where the
    colour camera sees the board, the board wins (no wall depth through it); wall the
    depth camera could not see stays empty; everything else is valid and on its surface.
    The two sides give both cases: cells that overlap, and a band that nothing covers."""
    Wd, Hd = 96, 72
    K = (86.4, 86.4, 47.3, 35.6)
    baseline = 0.05  # depth -> colour along x: the colour camera sits at x = -0.05
    z_board, z_wall = 0.25, 2.0
    x_edge = 0.0  # the board's edge, in the depth camera's frame
    xs = (np.arange(Wd) - K[2]) / K[0]
    on_board = (xs * z_board < x_edge) if near_side == "left" else (xs * z_board > x_edge)
    depth = np.broadcast_to(np.where(on_board, z_board, z_wall), (Hd, Wd)).astype(np.float32)
    T = np.eye(4)
    T[0, 3] = baseline
    aligner = DepthToColor(K, (Hd, Wd), K, (Hd, Wd), T)
    z = aligner(depth)
    # The device's uint16 units in, as the camera passes them: the same depth out.
    units = np.rint(depth / 1e-4).astype(np.uint16)
    np.testing.assert_allclose(aligner(units, depth_scale=1e-4), z, rtol=1e-6)

    # Truth per colour column: the board if the colour ray meets it within the board's
    # side of the edge, else the wall; a wall point counts as measured when the depth
    # camera's ray to it misses the board.
    xc = (np.arange(Wd) - K[2]) / K[0]

    def board_side(x):
        return x < x_edge if near_side == "left" else x > x_edge

    hits_board = board_side(xc * z_board - baseline)  # colour ray at the board's depth
    truth = np.where(hits_board, z_board, z_wall)
    x_wall = xc * z_wall - baseline
    wall_seen_by_depth = ~board_side(x_wall / z_wall * z_board)
    ud = K[0] * (xc * truth - baseline) / truth + K[2]  # where the depth camera sees it
    in_depth_image = (ud > -0.5) & (ud < Wd - 0.5)
    expect_valid = (hits_board | wall_seen_by_depth) & in_depth_image
    # A colour pixel next to an edge (of the board, of the depth image) is left out:
    # there the nearest depth pixel straddles it.
    u_board = K[0] * (x_edge + baseline) / z_board + K[2]
    u_wall_edge = K[0] * (x_edge / z_board * z_wall + baseline) / z_wall + K[2]
    cols = np.arange(Wd)
    clear = (np.abs(cols - u_board) > 1.0) & (np.abs(cols - u_wall_edge) > 1.0)
    clear &= (np.abs(ud + 0.5) > 1.0) & (np.abs(ud - Wd + 0.5) > 1.0)
    got = z > 0
    for row in (0, Hd // 2, Hd - 1):
        valid, zr = got[row], z[row]
        assert np.all(valid[clear] == expect_valid[clear]), (row, valid.astype(int))
        np.testing.assert_allclose(zr[valid & clear], truth[valid & clear], atol=1e-3)
    # Each case is there, several pixels wide: wall the depth camera measured that lands
    # behind the board in the colour image, or wall it did not see beside the board.
    u_wall = np.rint(K[0] * (xs * z_wall + baseline) / z_wall + K[2]).astype(int)
    lands = (u_wall >= 0) & (u_wall < Wd) & ~on_board
    hidden_wall = int(hits_board[np.clip(u_wall, 0, Wd - 1)][lands].sum())
    unseen_wall = int((~expect_valid & in_depth_image & clear).sum())
    if near_side == "left":
        assert hidden_wall >= 10 and unseen_wall == 0
    else:
        assert hidden_wall == 0 and unseen_wall >= 10


def test_alignment_on_a_sphere_before_a_wall():
    """Curved surfaces and a round silhouette, D435-like (640x480, depth f = 385 px,
    colour f = 615 px, 15 mm apart): a 0.25 m ball at 0.6 m before a wall at 1 m. Away
    from the silhouette (2 colour pixels) every aligned pixel is on the traced surface
    within 1 mm but a handful, and next to no valid surface is left empty."""
    W_, H_ = 640, 480
    Kd, Kc = (385.0, 385.0, 319.7, 239.3), (615.0, 615.0, 320.3, 240.1)
    centre, radius, z_wall = np.array([0.02, 0.01, 0.6]), 0.25, 1.0
    baseline = np.array([0.015, 0.0, 0.0])  # depth -> colour

    def trace(K, origin):  # z along the optical axis of the first surface hit
        xs, ys = np.meshgrid((np.arange(W_) - K[2]) / K[0], (np.arange(H_) - K[3]) / K[1])
        rays = np.stack([xs, ys, np.ones_like(xs)], -1)
        rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
        oc = origin - centre
        b = rays @ oc
        disc = b * b - (oc @ oc - radius**2)
        z_ball = np.where(disc > 0, (-b - np.sqrt(np.maximum(disc, 0))) * rays[..., 2], np.inf)
        return np.minimum(z_ball, z_wall - origin[2])

    depth = trace(Kd, np.zeros(3)).astype(np.float32)
    T = np.eye(4)
    T[:3, 3] = baseline
    z = DepthToColor(Kd, (H_, W_), Kc, (H_, W_), T)(depth)
    truth = trace(Kc, -baseline)  # the colour camera sits at -baseline in the depth frame
    win = np.lib.stride_tricks.sliding_window_view(np.pad(truth, 2, mode="edge"), (5, 5))
    near_silhouette = win.max(axis=(-2, -1)) > 1.05 * win.min(axis=(-2, -1))
    got = z > 0
    off = got & ~near_silhouette & (np.abs(z - truth) > 1e-3)
    assert off.sum() <= 20, off.sum()  # 5 measured
    inner = got[1:-1, :-2] & got[1:-1, 2:] & got[:-2, 1:-1] & got[2:, 1:-1]
    slivers = inner & ~got[1:-1, 1:-1]  # empty with all four neighbours valid
    assert slivers.sum() <= 40, slivers.sum()  # 20 measured of 307,200
    assert got.mean() > 0.98
