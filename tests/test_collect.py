"""`mu0 collect`: LeRobot v3 layout, lossless depth, sim truth, atomic episodes and resume;
then extraction from the recording with the simulator's truth attached."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("robosuite")
pytest.importorskip("pyarrow")

import pyarrow.parquet as pq  # noqa: E402

from envs.collect import CollectConfig, collect, finished_episodes  # noqa: E402
from mu0_core.extract.sources import LeRobotV3Source  # noqa: E402

pytestmark = pytest.mark.sim
STEPS = 12


@pytest.fixture(scope="module")
def env():
    from envs.robosuite_env import RobosuiteTraceEnv

    e = RobosuiteTraceEnv("Lift", "Panda", image_size=(64, 64))
    yield e
    e.close()


def _cfg(episodes: int) -> CollectConfig:
    return CollectConfig(episodes=episodes, image_size=(64, 64), max_steps=STEPS, seed=5)


def test_layout_resume_and_interrupt(tmp_path, env, monkeypatch):
    root = tmp_path / "ds"
    summary = collect(root, _cfg(1), progress=False, env=env)
    assert summary["episodes"] == summary["new"] == 1 and summary["frames"] == STEPS
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_frames"] == STEPS
    assert info["features"]["observation.depth.agentview"] == {
        "dtype": "float32",
        "shape": [64, 64],
        "names": ["height", "width"],
    }
    for path in (
        "meta/tasks.parquet",
        "meta/stats.json",
        "meta/episodes/chunk-000/file-000.parquet",
    ):
        assert (root / path).exists(), path
    tasks = pq.read_table(root / "meta/tasks.parquet")
    assert tasks.column("__index_level_0__").to_pylist() == ["pick up the cube"]
    data = pq.read_table(root / "data/chunk-000/file-000.parquet")
    assert data.column("index").to_pylist() == list(range(STEPS))
    assert b"huggingface" in data.schema.metadata

    # An interruption mid-episode keeps the finished one and leaves no partial file.
    calls = {"n": 0}
    real_step = env.step

    def failing_step(action):
        calls["n"] += 1
        if calls["n"] == STEPS + 3:
            raise KeyboardInterrupt
        return real_step(action)

    monkeypatch.setattr(env, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        collect(root, _cfg(3), progress=False, env=env)
    monkeypatch.undo()
    assert [m["extra"]["seed"] for m in finished_episodes(root)] == [5, 6]
    assert not list(root.rglob("*.tmp"))

    # Resuming records only what is missing, with the next seed.
    summary = collect(root, _cfg(3), progress=False, env=env)
    assert summary["new"] == 1 and [m["extra"]["seed"] for m in finished_episodes(root)] == [
        5,
        6,
        7,
    ]
    info = json.loads((root / "meta/info.json").read_text())
    assert info["total_episodes"] == 3 and info["total_frames"] == 3 * STEPS
    episodes = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["dataset_from_index"] for e in episodes] == [0, STEPS, 2 * STEPS]

    # Read back: lossless depth, calibrated camera, body poses, segmentation.
    source = LeRobotV3Source(root)
    ep = source.load(source.episode_ids()[1])
    assert ep.rgb.shape == (STEPS, 64, 64, 3) and ep.depth_m.dtype == np.float32
    assert ep.instruction == "pick up the cube" and ep.robot == "Panda"
    assert ep.sim is not None and ep.sim.body_pose.shape[0] == STEPS
    assert "cube_main" in ep.sim.body_names
    cube = ep.sim.body_names.index("cube_main")
    assert (ep.sim.segmentation[0] == cube).sum() > 0
    # The cube's recorded pose projects onto pixels the segmentation says show the cube.
    p = np.linalg.inv(ep.T_world_cam[0].astype(np.float64)) @ np.append(
        ep.sim.body_pose[0, cube, :3], 1
    )
    fx, fy, cx, cy = ep.intrinsics[0]
    u, v = int(round(fx * p[0] / p[2] + cx)), int(round(fy * p[1] / p[2] + cy))
    assert (ep.sim.segmentation[0, v - 1 : v + 2, u - 1 : u + 2] == cube).any()


def test_extract_from_recording_attaches_truth(tmp_path, env):
    from mu0_core.extract.pipeline import ExtractConfig, extract_episode
    from runtime.commands.bench_extract import label_errors, track_errors

    root = tmp_path / "ds"
    collect(
        root,
        CollectConfig(episodes=1, image_size=(64, 64), max_steps=30, seed=11),
        progress=False,
        env=env,
    )
    source = LeRobotV3Source(root)
    traces = extract_episode(source.load(source.episode_ids()[0]), ExtractConfig(num_points=32))
    assert "gt_future_uvz" in traces.arrays()
    errors = track_errors(traces)
    assert len(errors["px"]) > 0 and np.median(errors["px"]) < 2.0
    # The labels of the points that move (the arm reaching for the cube) against the truth:
    # millimetres, far closer than "no motion"; and those points lie on the robot's bodies.
    labels = label_errors(traces)
    assert labels["moving_points"] > 0 and len(labels["ade_mm"]) > 0
    assert np.median(labels["ade_mm"]) < 5.0
    assert np.median(labels["ade_mm"]) < 0.5 * np.median(labels["static_ade_mm"])
    s = traces.samples
    parts = s["gt_part"][s["point_mask"]]
    assert {1, 2} & set(parts.tolist()) and 0 in parts  # arm or gripper, and the scene


def test_only_success_stops_when_the_demonstrator_keeps_failing(tmp_path, env, monkeypatch):
    import dataclasses

    import envs.collect as collect_module

    monkeypatch.setattr(collect_module, "MAX_FAILED_IN_A_ROW", 2)
    cfg = dataclasses.replace(
        _cfg(2), only_success=True, max_steps=3
    )  # 3 steps never lift the cube
    with pytest.raises(RuntimeError, match="no episode to keep in 2 seeds in a row"):
        collect(tmp_path / "never", cfg, progress=False, env=env)
    assert finished_episodes(tmp_path / "never") == []


def test_seeds_not_kept_are_counted_by_cause(tmp_path, env):
    """A rollout that declines a seed (a recovery episode the demonstrator never took over) and
    a demonstrator failure under only_success are told apart in the summary."""
    import dataclasses

    from envs.collect import demonstrator_rollout

    play = demonstrator_rollout("Lift", STEPS)  # 12 steps never lift the cube: a failure

    def rollout(env, seed, rec):
        return None if seed == 5 else play(env, seed, rec)

    summary = collect(tmp_path / "a", _cfg(1), progress=False, env=env, rollout=rollout)
    assert summary["skipped"] == {"declined": 1, "failed": 0}
    assert [m["extra"]["seed"] for m in finished_episodes(tmp_path / "a")] == [6]
    cfg = dataclasses.replace(_cfg(1), only_success=True)
    calls = []

    def one_success(env, seed, rec):  # seeds 5 and 6 fail, 7 declined, 8 kept as a success
        calls.append(seed)
        if seed == 7:
            return None
        success, extra = play(env, seed, rec)
        return (seed == 8 or success), extra

    summary = collect(tmp_path / "b", cfg, progress=False, env=env, rollout=one_success)
    assert calls == [5, 6, 7, 8] and summary["skipped"] == {"declined": 1, "failed": 2}


def test_train_expert_on_a_recording(tmp_path, env, tiny_model):
    """Training an expert end to end: μ0 traces cached per episode, an expert that loads, the
    segment-goal error logged on held-out samples."""
    from mu0_core.checkpoint import save_checkpoint
    from policies import load_expert
    from policies.train import ExpertTrainConfig, train_expert

    collect(tmp_path / "rec", _cfg(1), progress=False, env=env)
    ckpt = save_checkpoint(tiny_model, tmp_path / "mu0")
    cfg = ExpertTrainConfig(
        robot="Panda",
        data=(str(tmp_path / "rec"),),
        checkpoint=str(ckpt),
        out_dir=str(tmp_path / "run"),
        steps=3,
        batch_size=4,
        device="cpu",
    )
    final = train_expert(cfg, progress=False)
    expert = load_expert(final)
    assert expert.cfg.instructions == ["pick up the cube"] and expert.goal is not None
    assert expert.cfg.goal_input and expert.goal_in is not None  # the default recipe
    assert len(list((tmp_path / "run/trace_cache").glob("*.safetensors"))) == 1
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["val_goal_err_mm"] >= 0
    assert rows[-1]["val_loss"] > 0 and rows[-1]["val_loss_no_trace"] > 0


def test_recovery_recording_keeps_the_demonstrators_frames(tmp_path, env, tiny_model):
    """A recovery episode: another policy drives, the demonstrator takes over at a state it can
    pick up from; every frame is recorded, and expert training keeps the demonstrator's only."""
    from envs.demos import make_demonstrator
    from policies.control import Handover, run_episode
    from policies.data import _state_actions, episode_samples, first_kept_frame
    from runtime.mu0_adapter import Mu0TraceModel

    class HoldOpen:  # stands in for an expert: no motion, the hand open
        chunk, execute = 16, 8

        def act(self, obs, seed=0):
            a = np.zeros((self.chunk, 7), np.float32)
            a[:, 6] = -1.0
            return a

    def rollout(env, seed, rec):
        ho = Handover(4, make_demonstrator("Lift"), open_steps=3)
        res = run_episode(
            env, HoldOpen(), "no_trace", seed, max_steps=STEPS, handover=ho, on_step=rec.add
        )
        return res.success, {"handover_frame": ho.taken_at}

    root = tmp_path / "rec"
    collect(root, _cfg(1), progress=False, env=env, rollout=rollout)
    meta = finished_episodes(root)[0]
    assert meta["length"] == STEPS and meta["extra"]["handover_frame"] == 4
    source = LeRobotV3Source(root)
    eid = source.episode_ids()[0]
    state, actions = _state_actions(source, eid)
    assert np.all(actions[:4, :6] == 0) and np.all(actions[:4, 6] == -1)
    assert np.abs(actions[4:, :3]).max() > 0.1  # the demonstrator heads for the cube
    assert first_kept_frame(source, eid) == 4
    mu0 = Mu0TraceModel(tiny_model)
    samples = episode_samples(source, eid, mu0, chunk=16, stride=3)
    np.testing.assert_array_equal(samples["proprio"], state[4::3])
    np.testing.assert_array_equal(samples["actions"][0, : STEPS - 4], actions[4:])


def test_recovery_rollout_refuses_what_it_cannot_do():
    from policies.recovery import recovery_rollout

    with pytest.raises(ValueError, match="picks up mid-task"):
        recovery_rollout("Door", None, None, (10, 20), max_steps=300)
    with pytest.raises(ValueError, match="handover steps 10..500"):
        recovery_rollout("Stack", None, None, (10, 500), max_steps=450)
