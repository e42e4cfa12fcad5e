"""Action experts, query points, and the control loop (with a trivial trace server)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mu0_core.geometry import xyz_to_uvz
from policies import ActionExpert, ExpertObservation, expert_config, load_expert, save_expert
from policies.control import wilson_interval
from policies.queries import QueryBuilder, traces_to_base

INSTR = ["pick up the cube", "stack the red cube on the green cube"]


def _expert(robot: str = "Panda") -> ActionExpert:
    torch.manual_seed(0)
    return ActionExpert(expert_config(robot, INSTR)).eval()


def _obs(n: int = 5, proprio_dim: int = 16, instruction: str = INSTR[0]) -> ExpertObservation:
    rng = np.random.default_rng(0)
    return ExpertObservation(
        traces_base=rng.normal(size=(n, 32, 3)).astype(np.float32) * 0.1,
        trace_valid=np.ones(n, bool),
        proprio=rng.normal(size=proprio_dim).astype(np.float32),
        instruction=instruction,
        point_rgb=rng.uniform(size=(n, 3)).astype(np.float32),
    )


def _batch(traces: torch.Tensor, actions: torch.Tensor, **extra) -> dict:
    """A training batch for traces [B, N, 32, 3] and actions [B, 16, 7]: every point valid,
    zero proprio, the first instruction, every action counted."""
    B, N = traces.shape[:2]
    return {
        "traces": traces,
        "trace_valid": torch.ones(B, N, dtype=torch.bool),
        "proprio": torch.zeros(B, 16),
        "instruction_ids": torch.zeros(B, dtype=torch.long),
        "actions": actions,
        "action_mask": torch.ones(B, 16, dtype=torch.bool),
        **extra,
    }


def _fit(e: ActionExpert, batch: dict, g: torch.Generator, steps: int = 250) -> ActionExpert:
    opt = torch.optim.AdamW(e.parameters(), lr=2e-3)
    for _ in range(steps):
        loss = e.loss(batch, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return e.eval()


def test_embodiments_have_their_proprio_sizes():
    dims = {r: expert_config(r, INSTR).proprio_dim for r in ("Panda", "UR5e", "Kinova3")}
    assert dims == {"Panda": 16, "UR5e": 19, "Kinova3": 20}
    with pytest.raises(ValueError, match="no action expert for 'Atlas'"):
        expert_config("Atlas", INSTR)


def test_act_shape_seeded_and_bounded():
    e = _expert()
    a = e.act(_obs(), seed=3)
    assert a.shape == (16, 7) and a.dtype == np.float32
    assert np.abs(a).max() <= 1.0
    np.testing.assert_array_equal(a, e.act(_obs(), seed=3))
    assert not np.array_equal(a, e.act(_obs(), seed=4))


def test_act_rejects_bad_input_with_clear_errors():
    e = _expert()
    with pytest.raises(ValueError, match="not trained on the instruction 'open the door'"):
        e.act(_obs(instruction="open the door"))
    with pytest.raises(ValueError, match=r"expects proprio\[16\], got \[19\]"):
        e.act(_obs(proprio_dim=19))
    bad = _obs()
    bad.trace_valid = np.ones(4, bool)
    with pytest.raises(ValueError, match="traces_base must be"):
        e.act(bad)
    no_rgb = _obs()
    no_rgb.point_rgb = None
    with pytest.raises(ValueError, match="trained with point colours: pass"):
        e.act(no_rgb)
    no_rgb.traces_available = False  # without traces there is nothing to colour
    assert e.act(no_rgb, seed=0).shape == (16, 7)


def test_save_load_round_trip(tmp_path):
    e = _expert("UR5e")
    save_expert(e, tmp_path / "ur5e", extra={"note": "test"})
    f = load_expert(tmp_path / "ur5e")
    assert f.embodiment == "UR5e" and f.chunk == 16 and f.execute == 8
    np.testing.assert_array_equal(e.act(_obs(proprio_dim=19), 1), f.act(_obs(proprio_dim=19), 1))
    with pytest.raises(FileNotFoundError, match="not an action-expert checkpoint"):
        load_expert(tmp_path)


@pytest.fixture
def one_thread():
    """Small-op training thrashes with several OpenMP threads on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_expert_learns_to_use_traces(one_thread):
    """Actions that point where the gripper's trace goes: learnable with traces, not without."""
    torch.manual_seed(0)
    cfg = expert_config("Panda", INSTR[:1])
    cfg.trace_dropout = 0.0
    cfg.width, cfg.point_width, cfg.depth = 128, 64, 2
    e = ActionExpert(cfg)
    g = torch.Generator().manual_seed(0)
    B = 128
    goal = torch.randn(B, 3, generator=g) * 0.05
    traces = torch.zeros(B, 4, 32, 3)
    traces[:, 0] = torch.linspace(0, 1, 32)[None, :, None] * goal[:, None]  # gripper to goal
    traces[:, 1:] = torch.randn(B, 3, 1, 3, generator=g) * 0.2  # still scene points
    actions = torch.zeros(B, 16, 7)
    actions[..., :3] = (goal / 0.05).clamp(-1, 1)[:, None]
    batch = _batch(traces, actions, point_rgb=torch.full((B, 4, 3), 0.5))
    _fit(e, batch, g)
    errs = {}
    for available in (True, False):
        ctx = e.encode_context(
            traces[:32],
            batch["trace_valid"][:32],
            batch["proprio"][:32],
            batch["instruction_ids"][:32],
            torch.full((32,), available),
            batch["point_rgb"][:32],
        )
        pred = e.sample(ctx, torch.Generator().manual_seed(1))
        errs[available] = float((pred[..., :3] - actions[:32, :, :3]).abs().mean())
    assert errs[True] < 0.25, errs
    assert errs[False] > 2 * errs[True], errs


def test_gripper_query_projects_to_its_pixel():
    rng = np.random.default_rng(0)
    H, W = 96, 128
    intr = np.array([100.0, 100.0, (W - 1) / 2, (H - 1) / 2], np.float32)
    T_base_cam = np.eye(4)
    T_base_cam[:3, 3] = [0.5, 0.0, 1.0]
    qb = QueryBuilder(num_scene_points=12)
    eef = [np.array([0.5 + 0.01 * k, 0.02, 1.6]) for k in range(3)]
    for p in eef:
        qb.observe(p)
    rgb = rng.integers(0, 255, size=(H, W, 3), dtype=np.uint8)
    depth = np.full((H, W), 1.2, np.float32)
    obs = qb.build(rgb, depth, intr, T_base_cam, "pick up the cube")
    assert obs["hist_uvz"].shape == (13, 8, 3) and obs["hist_valid"].shape == (13, 8)
    assert obs["hist_valid"][0].tolist() == [False] * 5 + [True] * 3  # three observed steps
    assert obs["hist_valid"][1:, -1].all() and not obs["hist_valid"][1:, :-1].any()
    # The newest gripper point: camera frame (0.02, 0.02, 0.6) → pixel (cx + 100·0.02/0.6, ...)
    u = (W - 1) / 2 + 100 * 0.02 / 0.6
    v = (H - 1) / 2 + 100 * 0.02 / 0.6
    np.testing.assert_allclose(
        obs["hist_uvz"][0, -1], [(2 * u + 1) / W - 1, (2 * v + 1) / H - 1, 0.6], atol=1e-5
    )
    np.testing.assert_allclose(obs["hist_uvz"][1:, -1, 2], 1.2)  # scene points read the depth
    # And back: camera-frame traces become base-frame ones with T_base_cam.
    back = traces_to_base(np.array([[[0.02, 0.02, 0.6]]], np.float32), T_base_cam)
    np.testing.assert_allclose(back[0, 0], eef[-1], atol=1e-6)
    np.testing.assert_allclose(
        xyz_to_uvz(np.array([0.0, 0.0, 2.0]), intr.astype(np.float64), (W, H)),
        [0.0, 0.0, 2.0],
        atol=1e-6,
    )


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and abs(hi - 0.1611) < 1e-3
    assert wilson_interval(50, 50)[1] == 1.0


@pytest.mark.sim
def test_control_loop_conditions_in_simulation(tmp_path):
    """mu0 (through a real server with a trivial model), no_trace, static_trace and oracle,
    12 steps each."""
    pytest.importorskip("robosuite")
    from envs.robosuite_env import RobosuiteTraceEnv
    from policies.control import GroundTruthTraces, LoopConfig, run_episode
    from runtime.client import TraceClient
    from runtime.model_api import EchoTraceModel
    from tests.runtime_helpers import running_server

    env = RobosuiteTraceEnv("Lift", "Panda", image_size=(64, 64))
    expert = _expert()
    oracle = GroundTruthTraces("Lift", "Panda")
    cfg = LoopConfig(trace_max_age_s=5.0, num_scene_points=8)
    with running_server(EchoTraceModel(image_size=None)) as server:
        client = TraceClient(f"tcp://127.0.0.1:{server.port}", max_age_s=5.0)
        client.start_stream()
        r = run_episode(env, expert, "mu0", 0, client=client, cfg=cfg, max_steps=12)
        client.close()
    assert r.steps == 12 and len(r.step_ms) == 12
    assert r.trace_age_ms, "no trace ever reached the loop"
    assert r.held_steps < 12
    r = run_episode(env, expert, "no_trace", 0, cfg=cfg, max_steps=12, record_frames=True)
    assert r.held_steps == 0 and len(r.frames) == 12 and r.frames[0].ndim == 3
    # static_trace: the expert sees the same points as with μ0, each held where it is now.
    seen = []
    act = expert.act
    expert.act = lambda o, seed=0: (seen.append(o), act(o, seed=seed))[1]
    r = run_episode(env, expert, "static_trace", 0, cfg=cfg, max_steps=12)
    expert.act = act
    assert r.held_steps == 0 and seen and all(o.traces_available for o in seen)
    first = seen[0]
    assert first.traces_base.shape == (9, 32, 3) and first.point_rgb.shape == (9, 3)
    np.testing.assert_array_equal(first.traces_base, first.traces_base[:, :1].repeat(32, 1))
    np.testing.assert_allclose(first.traces_base[0, 0], first.proprio[:3], atol=2e-3)
    # Oracle: the gripper's true future starts at the grip site and the demonstrator moves it.
    obs, _ = env.reset(seed=0)
    oracle.reset(0)
    qb = QueryBuilder(8)
    qb.observe(obs["proprio"][:3])
    wire = qb.build(obs["rgb"], obs["depth_m"], obs["intrinsics"], obs["T_base_cam"], "x")
    tr = oracle(env, wire, obs["T_base_cam"].astype(np.float64))
    assert tr.shape == (9, 32, 3)
    np.testing.assert_allclose(tr[0, 0], obs["proprio"][:3], atol=2e-3)
    assert np.linalg.norm(tr[0, -1] - tr[0, 0]) > 0.05  # the reach toward the cube
    oracle.close()
    env.close()
    with pytest.raises(ValueError, match="needs a trace client"):
        run_episode(env, expert, "mu0", 0)


def test_lagged_trace_indices_stay_in_their_episode():
    from policies.data import lagged_indices

    starts = np.repeat([0, 5, 12], [5, 7, 3])  # three episodes of 5, 7 and 3 samples
    rng = np.random.default_rng(0)
    idx = np.arange(15).repeat(50)
    lagged = lagged_indices(idx, starts, 2, rng)
    assert np.all(lagged <= idx) and np.all(idx - lagged <= 2)
    assert np.all(lagged >= starts[idx])  # never reaches into the previous episode
    assert set(np.unique(idx - lagged)) == {0, 1, 2}  # every lag occurs
    assert np.array_equal(lagged_indices(idx, starts, 0, rng), idx)


def test_segment_ends_at_the_next_gripper_event():
    from policies.data import segment_ends

    grip = np.array([-1, -1, 1, 1, 1, -1, -1, -1], np.float32)  # closes at sample 2
    starts = np.repeat([0, 5], [5, 3])  # two episodes
    # Open samples end where it closes; then at the episode's end; never across episodes.
    np.testing.assert_array_equal(segment_ends(grip, starts), [2, 2, 4, 4, 4, 7, 7, 7])


def test_rotation_between_quaternions():
    from policies.data import rotation_between

    def quat(axis, angle):
        axis = np.asarray(axis, float) / np.linalg.norm(axis)
        return np.r_[axis * np.sin(angle / 2), np.cos(angle / 2)][None]

    a, b = quat([0, 0, 1], 0.3), quat([0, 0, 1], 1.0)
    np.testing.assert_allclose(rotation_between(a, b), [[0, 0, 0.7]], atol=1e-6)
    np.testing.assert_allclose(rotation_between(a, -b), [[0, 0, 0.7]], atol=1e-6)  # q ~ -q
    # Non-commuting: x by 90° then z by 90° is the rotation z·x·x⁻¹ = z from x.
    x, z = quat([1, 0, 0], np.pi / 2), quat([0, 0, 1], np.pi / 2)
    zx = np.r_[
        np.cross(z[0, :3], x[0, :3]) + z[0, 3] * x[0, :3] + x[0, 3] * z[0, :3],
        z[0, 3] * x[0, 3] - z[0, :3] @ x[0, :3],
    ][None]  # z ⊗ x
    np.testing.assert_allclose(rotation_between(x, zx), [[0, 0, np.pi / 2]], atol=1e-6)


def test_goal_head_trains_and_old_experts_still_load(tmp_path):
    import json

    from policies.base import CONFIG_FILE, ActionExpertConfig

    e = _expert()
    assert e.goal is not None and e.cfg.absolute_points
    B = 4
    batch = _batch(
        torch.randn(B, 5, 32, 3) * 0.1, torch.zeros(B, 16, 7), point_rgb=torch.rand(B, 5, 3)
    )
    g = torch.Generator().manual_seed(0)
    plain = e.loss(batch, torch.Generator().manual_seed(0))
    goal = {"goal": torch.full((B, 3), 0.3), "goal_rot": torch.full((B, 3), 0.5)}
    with_goal = e.loss({**batch, **goal}, g)
    assert with_goal > plain  # the goal term counts
    with_goal.backward()
    assert e.goal[0].weight.grad.abs().sum() > 0

    # An expert saved before the options existed: relative point features and no goal head.
    path = save_expert(e, tmp_path / "new")
    meta = json.loads((path / CONFIG_FILE).read_text())
    for key in ("absolute_points", "point_colors", "goal_weight", "goal_rotation", "goal_input"):
        del meta["config"][key]
    cfg = ActionExpertConfig.from_dict(meta["config"])
    assert not cfg.absolute_points and not cfg.point_colors and cfg.goal_weight == 0
    assert not cfg.goal_input
    old = ActionExpert(cfg)
    assert old.goal is None and old.goal_in is None
    assert old.traces.point[0].in_features == 3 + 3 * 8 + 1
    assert old.act(_obs(), seed=0).shape == (16, 7)
    legacy_obs = _obs()
    legacy_obs.point_rgb = None  # experts without colours never needed them
    assert old.act(legacy_obs, seed=0).shape == (16, 7)


def test_goal_input_steers_the_action_head_without_training_the_goal_head():
    e = _expert().eval()
    assert e.cfg.goal_input and e.goal_in is not None
    B = 3
    traces = torch.randn(B, 5, 32, 3) * 0.1
    args = (traces, torch.ones(B, 5, dtype=torch.bool), torch.randn(B, 16))
    ids, rgb = torch.zeros(B, dtype=torch.long), torch.rand(B, 5, 3)
    on, off = torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)
    with torch.no_grad():
        ctx = e.encode_context(*args, ids, on, rgb)
        e.goal[-1].bias += 1.0  # another predicted goal, the same trace encoding
        assert not torch.allclose(e.encode_context(*args, ids, on, rgb), ctx)
        # Without traces there is no goal either: the context ignores both.
        blind = e.encode_context(*args, ids, off, rgb)
        e.goal[-1].bias -= 5.0
        assert torch.allclose(e.encode_context(*args, ids, off, rgb), blind)

    # The action loss alone leaves the goal head untouched (its input is detached)...
    e.train()
    with torch.no_grad():  # the output layer starts at zero, which would stop every gradient
        e.head[1].weight.normal_(std=0.02)
    batch = _batch(traces, torch.rand(B, 16, 7) * 2 - 1, point_rgb=rgb)
    e.loss(batch, torch.Generator().manual_seed(0), traces=True).backward()
    assert e.goal[0].weight.grad is None or e.goal[0].weight.grad.abs().sum() == 0
    assert e.goal_in[0].weight.grad.abs().sum() > 0
    # ...and with recorded goals, the goal loss trains it.
    e.zero_grad()
    goal = {"goal": torch.full((B, 3), 0.3), "goal_rot": torch.full((B, 3), 0.5)}
    e.loss({**batch, **goal}, torch.Generator().manual_seed(0), traces=True).backward()
    assert e.goal[0].weight.grad.abs().sum() > 0


def test_validation_holds_out_whole_episodes():
    from policies.train import split_episodes

    starts = np.repeat(np.arange(0, 200, 10), 10)  # 20 episodes of 10 samples
    val, train = split_episodes(starts, 0.1, np.random.default_rng(0))
    assert len(val) == 20 and len(train) == 180
    assert not set(starts[val]) & set(starts[train])  # no episode on both sides
    assert sorted(np.r_[val, train]) == list(range(200))
    # One episode: nothing to hold out, so it validates on what it trains on.
    val1, train1 = split_episodes(np.zeros(5, np.int64), 0.1, np.random.default_rng(0))
    assert list(val1) == list(train1) == list(range(5))


def test_validation_losses_with_and_without_traces():
    from policies.train import validation_metrics

    e = _expert().eval()
    with torch.no_grad():  # the action head starts at zero, which would ignore any context
        e.head[1].weight.normal_(0, 0.1)
    B = 6
    batch = _batch(
        torch.randn(B, 5, 32, 3) * 0.1,
        torch.rand(B, 16, 7) * 2 - 1,
        proprio=torch.randn(B, 16),
        goal=torch.randn(B, 3) * 0.1,
        goal_rot=torch.zeros(B, 3),
        point_rgb=torch.rand(B, 5, 3),
    )
    m = validation_metrics(e, batch, "cpu")
    assert set(m) == {"val_loss", "val_loss_no_trace", "val_goal_err_mm"}
    # Without traces the context is the learned "no trace" vector: a different loss.
    with torch.no_grad():
        e.no_trace.fill_(3.0)
    m2 = validation_metrics(e, batch, "cpu")
    assert m2["val_loss"] == pytest.approx(m["val_loss"])
    assert m2["val_loss_no_trace"] != pytest.approx(m["val_loss_no_trace"])


def test_point_colors_are_read_where_each_query_is():
    from policies.queries import point_colors

    rgb = np.full((48, 64, 3), 255, np.uint8)
    rgb[10:15, 20:25] = (200, 0, 0)  # a red patch around pixel (22, 12)
    rgb[30:35, 40:45] = (0, 150, 0)  # a green one around (42, 32)
    px = np.array([[22.0, 12.0], [42.0, 32.0], [5.0, 40.0], [63.0, 0.0]])
    hist = np.zeros((4, 8, 3), np.float32)
    hist[:, -1, 0] = (2 * px[:, 0] + 1) / 64 - 1  # normalised uv (pixel centres)
    hist[:, -1, 1] = (2 * px[:, 1] + 1) / 48 - 1
    c = point_colors({"rgb": rgb, "hist_uvz": hist})
    assert c.shape == (4, 3) and c.dtype == np.float32
    np.testing.assert_allclose(c[0], [200 / 255, 0, 0], atol=1e-6)
    np.testing.assert_allclose(c[1], [0, 150 / 255, 0], atol=1e-6)
    np.testing.assert_allclose(c[2:], 1.0)  # white table; the image's corner is clipped


def test_expert_tells_points_apart_by_colour(one_thread):
    """Move to the red one of two still points: learnable only from their colours."""
    torch.manual_seed(0)
    cfg = expert_config("Panda", INSTR[:1])
    cfg.trace_dropout, cfg.point_dropout, cfg.goal_weight = 0.0, 0.0, 0.0
    cfg.goal_input = False  # no goal head to feed it
    cfg.width, cfg.point_width, cfg.depth = 128, 64, 2
    g = torch.Generator().manual_seed(0)
    B = 128
    where = torch.randn(B, 2, 3, generator=g) * 0.05  # two still points
    red_first = torch.rand(B, generator=g) < 0.5
    target = torch.where(red_first[:, None], where[:, 0], where[:, 1])
    traces = torch.zeros(B, 3, 32, 3)
    traces[:, 1:] = where[:, :, None]
    red, green = torch.tensor([0.8, 0.1, 0.1]), torch.tensor([0.1, 0.7, 0.1])
    rgb = torch.full((B, 3, 3), 0.5)
    rgb[:, 1] = torch.where(red_first[:, None], red, green)
    rgb[:, 2] = torch.where(red_first[:, None], green, red)
    actions = torch.zeros(B, 16, 7)
    actions[..., :3] = (target / 0.1).clamp(-1, 1)[:, None]
    batch = _batch(traces, actions)
    errs = {}
    for colors in (True, False):
        cfg.point_colors = colors
        torch.manual_seed(0)
        b = {**batch, "point_rgb": rgb} if colors else batch
        e = _fit(ActionExpert(cfg), b, g)
        ctx = e.encode_context(
            traces,
            b["trace_valid"],
            b["proprio"],
            b["instruction_ids"],
            torch.ones(B, dtype=torch.bool),
            b.get("point_rgb"),
        )
        pred = e.sample(ctx, torch.Generator().manual_seed(1))
        errs[colors] = float((pred[..., :3] - actions[..., :3]).abs().mean())
    assert errs[True] < 0.5 * errs[False], errs


def test_traces_longer_than_any_in_training_are_shortened():
    from policies.train import future_limits

    traces = np.zeros((3, 2, 32, 3), np.float16)
    traces[1, 1, :, 0] = np.linspace(0, 0.31, 32)  # one point moving 1 cm a step along x
    steps = [1, 3, 31]
    np.testing.assert_allclose(future_limits(traces, steps, 1.0), [0.01, 0.03, 0.31], atol=2e-4)
    traces = np.zeros((1000, 1, 32, 3), np.float16)
    traces[:, 0, :, 2] = np.linspace(0, 1, 32) * np.linspace(0, 1, 1000)[:, None]
    traces[-1, 0, :, 2] = np.linspace(0, 50, 32)  # one outlier does not set the limit
    assert 0.99 < future_limits(traces, [31])[0] < 1.1

    def expert(clip):
        cfg = expert_config("Panda", INSTR)
        cfg.future_clip_m = clip
        torch.manual_seed(0)
        e = ActionExpert(cfg).eval()
        with torch.no_grad():  # the action head starts at zero, which would ignore any input
            e.head[1].weight.normal_(0, 0.1)
        return e

    far, near = _obs(), _obs()
    direction = np.array([0.6, 0.0, 0.8], np.float32)
    far.traces_base[0] = far.traces_base[0, :1] + np.linspace(0, 2.0, 32)[:, None] * direction
    near.traces_base[0] = near.traces_base[0, :1] + np.linspace(0, 2.0, 32)[:, None] * direction
    near.traces_base[0, 1:] = near.traces_base[0, :1] + 0.01 * direction  # already at the limit
    clipped, unclipped = expert([0.01] * 8), expert(None)
    np.testing.assert_allclose(clipped.act(far, seed=0), clipped.act(near, seed=0), atol=1e-5)
    assert np.abs(unclipped.act(far, seed=0) - unclipped.act(near, seed=0)).max() > 1e-3
    with pytest.raises(ValueError, match="one length per trace step"):
        expert([0.01])


@pytest.mark.parametrize("robot", ["Panda", "UR5e"])
def test_shipped_experts_load_and_act(robot):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "checkpoints" / "experts" / robot
    e = load_expert(path)
    cfg = e.cfg
    assert e.embodiment == robot
    assert {"pick up the cube", "open the door"} <= set(cfg.instructions)
    assert cfg.point_colors and cfg.absolute_points and e.goal is not None
    assert cfg.future_clip_m is not None and len(cfg.future_clip_m) == len(cfg.trace_steps)
    obs = _obs(n=33, proprio_dim=cfg.proprio_dim)
    obs.traces_base[:] = obs.traces_base[:, :1]  # still traces, as μ0's mostly are
    a = e.act(obs, seed=0)
    assert a.shape == (16, 7) and np.isfinite(a).all() and np.abs(a).max() <= 1.0
