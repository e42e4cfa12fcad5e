"""TraceExtract on synthetic RGB-D scenes with known motion: tracking, lifting, segments,
samples, sources, the parallel runner (processes and Ray) and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from mu0_core import trace_dataset as td  # noqa: E402
from mu0_core.extract import ExtractError  # noqa: E402
from mu0_core.extract.lifting import lift_tracks, rigid_body_tracks  # noqa: E402
from mu0_core.extract.pipeline import ExtractConfig, extract_episode, run_extract  # noqa: E402
from mu0_core.extract.segments import segment_episode  # noqa: E402
from mu0_core.extract.sources import FolderSource, RGBDEpisode  # noqa: E402
from mu0_core.extract.tracking import make_tracker  # noqa: E402
from mu0_core.geometry import uvz_to_xyz  # noqa: E402

H = W = 64
K = np.array([80.0, 80.0, 31.5, 31.5], np.float32)
F, MOVE_FRAMES, SQUARE = 24, 14, 16  # the square moves 1 px per frame for 14 frames, then rests


def _texture(seed: int, shape) -> np.ndarray:
    noise = np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 1.2) * 2.5 - 190, 0, 255).astype(np.uint8)


def _scene(episode_id="scene", seed=0) -> RGBDEpisode:
    """A textured square 0.8 m away sliding right over a textured wall 1 m away."""
    wall, square = _texture(seed, (H, W, 3)), _texture(seed + 1, (SQUARE, SQUARE, 3))
    rgb = np.zeros((F, H, W, 3), np.uint8)
    depth = np.zeros((F, H, W), np.float32)
    for t in range(F):
        x = 12 + min(t, MOVE_FRAMES)
        rgb[t], depth[t] = wall, 1.0
        rgb[t, 24 : 24 + SQUARE, x : x + SQUARE] = square
        depth[t, 24 : 24 + SQUARE, x : x + SQUARE] = 0.8
    gripper = (np.arange(F) >= 6).astype(np.float32)  # closes at frame 6
    return RGBDEpisode(
        id=episode_id,
        rgb=rgb,
        depth_m=depth,
        intrinsics=np.tile(K, (F, 1)),
        T_world_cam=np.tile(np.eye(4, dtype=np.float32), (F, 1, 1)),
        instruction="push the square",
        task="push",
        gripper_closed=gripper,
        up_world=np.array([0.0, -1.0, 0.0]),
    )


def test_lk_tracks_known_motion_to_subpixel():
    ep = _scene()
    query = np.array([[20.0, 30.0], [22.5, 33.0], [5.0, 5.0], [50.0, 50.0]], np.float32)
    tracks = make_tracker("lk").track(ep.rgb, query)
    shift = np.minimum(np.arange(F), MOVE_FRAMES)
    expected = (
        query[None]
        + np.stack([shift, 0 * shift], 1)[:, None] * np.array([1, 1, 0, 0])[None, :, None]
    )
    assert tracks.visible[:, :2].all()
    err = np.linalg.norm(tracks.uv_px - expected, axis=-1)[tracks.visible]
    assert np.median(err) < 0.1 and err.max() < 0.5
    # Queried mid-episode, the same points are followed backward and forward.
    mid = make_tracker("lk").track(ep.rgb, expected[MOVE_FRAMES], query_frame=MOVE_FRAMES)
    assert mid.visible[:, :2].all() and (mid.query_frame == MOVE_FRAMES).all()
    np.testing.assert_allclose(mid.uv_px[:, :2], tracks.uv_px[:, :2], atol=0.05)


def test_lift_aligns_a_moving_camera_in_one_world_frame():
    # A fixed world point seen by a camera that slides along x: its pixel moves, its
    # lifted world position must not.
    p_world = np.array([0.1, -0.05, 1.2])
    T = np.tile(np.eye(4), (5, 1, 1))
    T[:, 0, 3] = np.linspace(0, 0.2, 5)  # camera -> world
    p_cam = p_world - T[:, :3, 3]
    uv = np.stack(
        [K[0] * p_cam[:, 0] / p_cam[:, 2] + K[2], K[1] * p_cam[:, 1] / p_cam[:, 2] + K[3]], 1
    )
    depth = np.full((5, H, W), p_cam[0, 2], np.float32)
    xyz, valid = lift_tracks(uv[:, None], np.ones((5, 1), bool), depth, np.tile(K, (5, 1)), T)
    assert valid.all()
    np.testing.assert_allclose(xyz[:, 0], np.tile(p_world, (5, 1)), atol=1e-6)


def test_rigid_body_truth_follows_the_body():
    pose = np.zeros((3, 1, 7))
    pose[:, 0, 3] = 1.0  # identity rotations
    pose[:, 0, 0] = [0.0, 0.1, 0.2]
    out = rigid_body_tracks(np.array([[1.0, 2.0, 3.0]]), np.array([0]), pose)
    np.testing.assert_allclose(out[:, 0, 0], [1.0, 1.1, 1.2])


def test_segments_split_at_gripper_events_and_pauses():
    activity = np.r_[np.full(10, 0.01), np.zeros(8), np.full(6, 0.01)]
    gripper = (np.arange(24) >= 5).astype(float)
    assert segment_episode(activity, gripper) == [(0, 5), (5, 10), (10, 18), (18, 24)]
    assert segment_episode(activity, None) == [(0, 10), (10, 18), (18, 24)]


def test_extract_episode_end_to_end():
    ep = _scene()
    traces = extract_episode(ep, ExtractConfig(num_points=40))
    N = len(traces.query_uv_px)
    # Points picked in frame 0; wall points the square covers are lost and replaced by new
    # tracks later, never more live at once than asked for.
    assert 20 <= (traces.query_frame == 0).sum() <= 40
    assert (traces.query_frame > 0).any() and traces.visible.sum(1).max() <= 40
    # The square's points are found (motion saliency) and flagged moving with one rigid group.
    q = np.round(traces.query_uv_px).astype(int)
    on_square = ep.depth_m[traces.query_frame, q[:, 1], q[:, 0]] < 0.9
    # What follows is about the points of frame 0 (later ones may start after the motion).
    on_square &= traces.query_frame == 0
    assert on_square.sum() >= 5
    assert traces.moving[on_square].mean() > 0.8
    # Wall points the square runs over may be dragged by its edge for a few frames before
    # the checks drop them; the wall points still tracked at the end have not moved.
    wall = (traces.query_frame == 0) & ~on_square
    assert (~traces.moving[wall]).mean() > 0.6
    kept = wall & traces.valid[-1]
    assert kept.sum() >= 10
    assert np.abs(traces.uv_px[-1, kept] - traces.query_uv_px[kept]).max() < 1.0
    groups = traces.group_id[on_square & traces.moving]
    assert (groups == np.bincount(groups[groups >= 0]).argmax()).mean() >= 0.7 and 0 not in groups
    # 3D: a square point moves 0.8 m / fx per pixel.
    seen = np.flatnonzero(on_square & traces.valid[MOVE_FRAMES])
    moved = np.median(traces.xyz_world[MOVE_FRAMES, seen] - traces.xyz_world[0, seen], axis=0)
    np.testing.assert_allclose(moved, [MOVE_FRAMES * 0.8 / K[0], 0, 0], atol=2e-3)
    n = seen[
        np.argmin(
            np.abs(traces.uv_px[MOVE_FRAMES, seen, 0] - traces.query_uv_px[seen, 0] - MOVE_FRAMES)
        )
    ]

    # Segments: the grasp at frame 6 and the pause after frame 14 cut the episode.
    bounds = [(s.start, s.end) for s in traces.segments]
    assert bounds[0] == (0, 6) and any(s.start == 6 for s in traces.segments)
    assert "grasp" in traces.captions[1]
    assert traces.captions[-1] == "hold still"

    arrays, strings = traces.arrays(), traces.strings()
    S = len(arrays["sample_frame"])
    # A sample holds the points known at its frame (never more than asked for), in track
    # order; sample_track says which.
    slots = arrays["point_mask"].sum(1).max()
    assert slots <= 40 and traces.sample_track.shape == (S, slots)
    assert (
        S == F
        and arrays["future_uvz"].shape == (S, slots, 32, 3)
        and arrays["hist_uvz"].shape == (S, slots, 8, 3)
    )
    for i, t in enumerate(arrays["sample_frame"]):
        known = traces.sample_track[i][arrays["point_mask"][i]]
        np.testing.assert_array_equal(known, np.flatnonzero(traces.valid[t]))
    # Future step 0 = the current position = the last history step (frame t's camera).
    m = arrays["point_mask"]
    np.testing.assert_allclose(
        arrays["future_uvz"][:, :, 0][m], arrays["hist_uvz"][:, :, -1][m], atol=1e-5
    )
    # A fixed window: at frame 6, future step k is where the track is at frame 6 + k, until
    # the episode ends at F (unsmoothed: smoothing rounds the stop at frame 14 by < 1 px).
    raw = extract_episode(ep, ExtractConfig(num_points=40, smooth_frames=1))
    i = 6
    c = int(np.flatnonzero(raw.sample_track[i] == n)[0])  # track n's column in sample i
    ok = raw.samples["future_valid"][i, c]
    assert ok[: F - i].all() and not ok[F - i :].any()
    u_px = ((raw.samples["future_uvz"][i, c, : F - i, 0] + 1) * W - 1) / 2
    np.testing.assert_allclose(u_px, raw.uv_px[i:, n, 0], atol=1e-3)
    assert arrays["hist_valid"][0, :, :-1].sum() == 0  # nothing before the first frame
    assert len(strings["sample_caption"]) == S and strings["instruction"] == "push the square"
    report = traces.report()
    assert report["points"] == N and 0 < report["coverage"] <= 1 and report["share_valid"] > 0.5


def test_arc_target_retimes_within_the_window_and_never_stretches_a_lost_track():
    ep = _scene()
    traces = extract_episode(ep, ExtractConfig(num_points=40, target="arc"))
    arrays = traces.arrays()
    i = 6
    moving = arrays["point_mask"][i] & arrays["moving"][i]
    c = int(np.flatnonzero(moving)[0])
    ok = arrays["future_valid"][i, c]
    # Valid only for the frames the window saw (the episode ends at F), in equal arc steps
    # from the start to where the point is at the window's last seen frame.
    n_ok = int(ok.sum())
    assert ok[:n_ok].all() and n_ok <= F - i
    path = arrays["future_uvz"][i, c, :n_ok, :2]
    steps = np.linalg.norm(np.diff(path, axis=0), axis=-1)
    moving_steps = steps[steps > 1e-6]
    assert moving_steps.std() < 0.1 * moving_steps.mean()
    track = traces.sample_track[i, c]
    u_end = ((path[-1, 0] + 1) * W - 1) / 2
    assert abs(u_end - traces.uv_px[i + n_ok - 1, track, 0]) < 0.15  # smoothed track


def test_window_stride_and_lost_tracks_are_invalid_from_the_loss_on():
    import mu0_core.extract.pipeline as pl

    ep = _scene()
    cfg = ExtractConfig(num_points=40, frame_stride=2, smooth_frames=1)
    F_, N = 12, 3
    xyz = np.zeros((F_, N, 3))
    xyz[..., 2] = 1.0
    xyz[:, :, 0] = np.arange(F_)[:, None] * 0.01  # 1 cm a frame to the camera's right
    valid = np.ones((F_, N), bool)
    valid[5, 1] = False  # point 1 is lost at frame 5 and "comes back" at 6
    ep_short = RGBDEpisode(
        id="short",
        rgb=ep.rgb[:F_],
        depth_m=ep.depth_m[:F_],
        intrinsics=ep.intrinsics[:F_],
        T_world_cam=np.repeat(np.eye(4, dtype=np.float32)[None], F_, 0),
        instruction="x",
    )
    t_arr = np.array([0, 4])
    known = np.ones((2, N), bool)
    fut, ok = pl.future_targets(ep_short, xyz, valid, t_arr, known, cfg)
    # Stride 2: step k is frame t + 2k; frames past 11 are outside the episode.
    assert ok[0, 0, :6].all() and not ok[0, 0, 6:].any()
    # A stride-2 window from frame 0 never looks at frame 5, where point 1 was lost.
    assert ok[0, 1, :6].all()
    xyz_fut = uvz_to_xyz(fut[0, 0, :6], ep_short.intrinsics[0], np.array([W, H]))
    np.testing.assert_allclose(xyz_fut[:, 0], np.arange(0, 12, 2) * 0.01, atol=1e-6)
    # With stride 1 the loss at frame 5 ends point 1's future for good.
    fut1, ok1 = pl.future_targets(
        ep_short, xyz, valid, t_arr, known, ExtractConfig(num_points=40, smooth_frames=1)
    )
    assert ok1[0, 1, :5].all() and not ok1[0, 1, 5:].any()
    assert ok1[1, 1, :1].all() and not ok1[1, 1, 1:].any()


def _entering_scene() -> RGBDEpisode:
    """A textured square sliding in from the left edge, 2 px per frame, over the wall."""
    ep = _scene("entering")
    wall, square = _texture(0, (H, W, 3)), _texture(1, (SQUARE, SQUARE, 3))
    for t in range(F):
        x = -SQUARE + 2 * t
        ep.rgb[t], ep.depth_m[t] = wall, 1.0
        ep.rgb[t, 24 : 24 + SQUARE, max(x, 0) : max(x + SQUARE, 0)] = square[:, max(-x, 0) :]
        ep.depth_m[t, 24 : 24 + SQUARE, max(x, 0) : max(x + SQUARE, 0)] = 0.8
    return ep


def test_reseeded_tracks_start_mid_episode_with_masked_history(tmp_path):
    ep = _entering_scene()
    traces = extract_episode(ep, ExtractConfig(num_points=30, reseed_every=2))
    N, qf = len(traces.query_frame), traces.query_frame
    late = np.flatnonzero(qf > 0)
    assert len(late) >= 5
    # A track does not exist before its query frame, and starts seen there.
    before = np.arange(F)[:, None] < qf[None, :]
    assert not traces.visible[before].any() and not traces.valid[before].any()
    assert traces.visible[qf, np.arange(N)].all()
    # The square was out of view at frame 0: only re-seeding gives it points, which follow it.
    q = np.round(traces.query_uv_px[late]).astype(int)
    on_square = late[ep.depth_m[qf[late], q[:, 1], q[:, 0]] < 0.9]
    assert len(on_square) >= 3 and traces.moving[on_square].all()
    t0 = qf[on_square[0]]
    moved = traces.uv_px[t0 + 4, on_square[0]] - traces.uv_px[t0, on_square[0]]
    np.testing.assert_allclose(moved, [8.0, 0.0], atol=0.5)
    plain = extract_episode(ep, ExtractConfig(num_points=30, reseed_every=0))
    assert (plain.query_frame == 0).all()
    assert traces.report()["share_valid"] > plain.report()["share_valid"] + 0.1

    # Samples: steps before a track starts are invalid (zeros) in every history window.
    arrays, track = traces.arrays(), traces.sample_track  # track: [S, N'] -1 = padding
    assert ((track >= 0) == arrays["point_mask"]).all()
    start = np.where(track >= 0, qf[track], F)  # [S, N'] first frame of each column's track
    steps = arrays["sample_frame"][:, None] + np.arange(-7, 1)[None, :]  # [S, 8]
    not_yet = steps[:, None, :] < start[:, :, None]  # [S, N', 8]
    assert not arrays["hist_valid"][not_yet].any()
    assert (arrays["hist_uvz"][not_yet] == 0).all()
    partial = arrays["point_mask"] & not_yet.any(-1)
    assert partial[np.isin(track, late)].any()  # some windows hold a track's first steps only

    # ... and so in the batches pretraining reads back.
    td.write_episode(tmp_path, ep.id, arrays, traces.strings())
    td.write_meta(tmp_path, [traces.meta()], source="test")
    ds = td.TraceDataset(tmp_path)
    batch = td.collate_traces([ds[i] for i in range(len(ds))])
    hv, pm = batch.hist_valid, batch.point_mask
    assert hv[..., -1][pm].all() and not hv[~pm].any()
    assert (batch.hist_uvz[~hv] == 0).all()
    assert (pm & hv[..., -1] & ~hv[..., 0]).any()


def test_reseeding_works_with_any_tracker():
    class TrackOnly:  # a plug-in tracker with only the protocol's `track`
        def __init__(self):
            self.lk = make_tracker("lk")

        def track(self, rgb, query_uv_px, query_frame=0):
            return self.lk.track(rgb, query_uv_px, query_frame)

    ep, cfg = _entering_scene(), ExtractConfig(num_points=30, reseed_every=2)
    native, generic = extract_episode(ep, cfg), extract_episode(ep, cfg, tracker=TrackOnly())
    np.testing.assert_array_equal(native.query_frame, generic.query_frame)
    np.testing.assert_array_equal(native.visible, generic.visible)
    np.testing.assert_allclose(native.uv_px, generic.uv_px, atol=1e-4)


def _write_folder(root, ep: RGBDEpisode, depth: bool = True):
    (root / "rgb").mkdir(parents=True)
    (root / "depth").mkdir()
    for t in range(ep.num_frames):
        cv2.imwrite(str(root / "rgb" / f"{t:06d}.png"), ep.rgb[t, :, :, ::-1])
        if depth:
            cv2.imwrite(
                str(root / "depth" / f"{t:06d}.png"),
                np.round(ep.depth_m[t] * 1000).astype(np.uint16),
            )
    (root / "instruction.txt").write_text(ep.instruction)


def test_folder_source_runner_errors_and_resume(tmp_path):
    src_dir = tmp_path / "frames"
    ep = _scene()
    _write_folder(src_dir / "good", ep)
    _write_folder(src_dir / "no_depth", ep, depth=False)
    (src_dir / "empty" / "rgb").mkdir(parents=True)
    fx, fy, cx, cy = K.tolist()
    (src_dir / "intrinsics.json").write_text(json.dumps({"fx": fx, "fy": fy, "cx": cx, "cy": cy}))

    source = FolderSource(src_dir)
    assert source.episode_ids() == ["empty", "good", "no_depth"]
    loaded = source.load("good")
    np.testing.assert_array_equal(loaded.rgb, ep.rgb)
    np.testing.assert_allclose(loaded.depth_m, ep.depth_m, atol=1e-6)

    out = tmp_path / "traces"
    report = run_extract(source, out, ExtractConfig(num_points=24), workers=1, progress=False)
    errors = {f["id"]: f["error"] for f in report["failed"]}
    assert set(errors) == {"empty", "no_depth"}
    assert "episode no_depth" in errors["no_depth"] and "depth" in errors["no_depth"]
    assert "episode empty" in errors["empty"]
    ds = td.TraceDataset(out)
    assert [e["id"] for e in ds.episodes] == ["good"] and len(ds) == F
    assert ds[3]["instruction"] == "push the square"

    # A rerun skips what is done and gives the same dataset.
    before = (out / "episodes" / "good.safetensors").stat().st_mtime_ns
    again = run_extract(source, out, ExtractConfig(num_points=24), workers=1, progress=False)
    assert (out / "episodes" / "good.safetensors").stat().st_mtime_ns == before
    assert again["episodes"] == 1


def test_bad_input_names_the_episode():
    ep = _scene("broken")
    ep.depth_m = ep.depth_m[:, :32]
    with pytest.raises(ExtractError, match="episode broken: depth"):
        extract_episode(ep)
    ep = _scene("short")
    ep.rgb, ep.depth_m = ep.rgb[:1], ep.depth_m[:1]
    with pytest.raises(ExtractError, match="episode short: needs at least 2 frames"):
        extract_episode(ep)


def test_ray_path_gives_the_same_files(tmp_path):
    ray = pytest.importorskip("ray")
    src_dir = tmp_path / "frames" / "good"
    _write_folder(src_dir, _scene())
    (src_dir / "intrinsics.json").write_text(
        json.dumps(dict(zip(["fx", "fy", "cx", "cy"], K.tolist())))
    )
    cfg = ExtractConfig(num_points=16)
    run_extract(FolderSource(src_dir.parent), tmp_path / "local", cfg, workers=1, progress=False)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        run_extract(
            FolderSource(src_dir.parent), tmp_path / "ray", cfg, use_ray=True, progress=False
        )
    finally:
        ray.shutdown()
    from safetensors.numpy import load_file

    a = load_file(tmp_path / "local" / "episodes" / "good.safetensors")
    b = load_file(tmp_path / "ray" / "episodes" / "good.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
