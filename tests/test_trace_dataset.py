"""The trace dataset contract: atomic writes, lazy reads, collation into a TraceBatch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mu0_core import trace_dataset as td
from mu0_core.types import TraceBatch


def _episode(F=6, S=4, N=5, H=12, W=16, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "rgb": rng.integers(0, 255, (F, H, W, 3), dtype=np.uint8),
        "depth_m": rng.uniform(0.5, 2, (F, H, W)).astype(np.float32),
        "intrinsics": np.tile(np.array([20, 20, 7.5, 5.5], np.float32), (F, 1)),
        "T_world_cam": np.tile(np.eye(4, dtype=np.float32), (F, 1, 1)),
        "sample_frame": np.arange(S, dtype=np.int64),
        "hist_uvz": rng.normal(size=(S, N, 8, 3)).astype(np.float32),
        "hist_valid": np.ones((S, N, 8), bool),
        "future_uvz": rng.normal(size=(S, N, 32, 3)).astype(np.float32),
        "future_valid": np.ones((S, N, 32), bool),
        "point_mask": np.ones((S, N), bool),
        "group_id": np.zeros((S, N), np.int64),
        "moving": np.zeros((S, N), bool),
        "sample_segment": np.array([0, 0, 1, 1], np.int64)[:S],
    }
    arrays["point_mask"][1, 3:] = False
    strings = {
        "instruction": "pick up the cube",
        "captions": ["reach", "lift"],
        "sample_caption": [0, 0, 1, 1][:S],
    }
    return arrays, strings


def _write(tmp_path, ids=("a", "b"), truth=False):
    metas = []
    for i, eid in enumerate(ids):
        arrays, strings = _episode(seed=i)
        if truth:  # the simulator's truth: the labels a little off, known at every step
            arrays["gt_future_uvz"] = arrays["future_uvz"] + np.float32(0.05)
            arrays["gt_future_valid"] = np.ones_like(arrays["future_valid"])
        td.write_episode(tmp_path, eid, arrays, strings)
        metas.append(
            {
                "id": eid,
                "task": "Lift",
                "robot": "Panda",
                "instruction": strings["instruction"],
                "num_frames": 6,
                "num_samples": 4,
            }
        )
    td.write_meta(tmp_path, metas, source="test", report={"points": 10})
    return metas


def test_roundtrip_and_lazy_items(tmp_path):
    _write(tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["format"] == "mu0-traces" and meta["version"] == td.VERSION
    assert (meta["history_steps"], meta["horizon"]) == (8, 32)

    ds = td.TraceDataset(tmp_path)
    assert len(ds) == 8 and [e["id"] for e in ds.episodes] == ["a", "b"]
    arrays, _ = _episode(seed=1)
    item = ds[6]  # episode b, sample 2
    assert item["episode"] == "b" and item["frame"] == 2 and item["caption"] == "lift"
    assert item["instruction"] == "pick up the cube"
    np.testing.assert_array_equal(item["rgb"], arrays["rgb"][2])
    np.testing.assert_array_equal(item["future_uvz"], arrays["future_uvz"][2])
    assert item["image_size"].tolist() == [16, 12] and item["hist_uvz"].shape == (5, 8, 3)

    only_b = td.TraceDataset(tmp_path, episodes=["b"])
    assert len(only_b) == 4 and only_b[0]["episode"] == "b"
    with pytest.raises(KeyError, match="zzz"):
        td.TraceDataset(tmp_path, episodes=["zzz"])
    with pytest.raises(IndexError):
        ds[8]


def test_collate_pads_and_subsamples(tmp_path):
    _write(tmp_path)
    ds = td.TraceDataset(tmp_path)
    items = [ds[0], ds[1]]  # 5 points, then 3 (two are padding)
    batch = td.collate_traces(items)
    assert isinstance(batch, TraceBatch)
    assert batch.hist_uvz.shape == (2, 5, 8, 3) and batch.future_uvz.shape == (2, 5, 32, 3)
    assert batch.point_mask.sum(1).tolist() == [5, 3]
    assert batch.rgb.dtype == torch.uint8 and batch.image_size.tolist() == [[16, 12]] * 2
    assert batch.group_id.shape == (2, 5) and batch.instructions == ["pick up the cube"] * 2
    # Kept points keep their values: item 1's three real points come first.
    np.testing.assert_array_equal(batch.hist_uvz[1, :3].numpy(), items[1]["hist_uvz"][:3])

    small = td.collate_traces(items, max_points=2, rng=np.random.default_rng(0))
    assert small.hist_uvz.shape[1] == 2 and small.point_mask.all()


def test_bad_input_is_rejected(tmp_path):
    arrays, strings = _episode()
    bad = dict(arrays, hist_valid=arrays["hist_valid"][:, :, :4])
    with pytest.raises(ValueError, match="episode x: hist_valid"):
        td.write_episode(tmp_path, "x", bad, strings)
    with pytest.raises(ValueError, match="float32"):
        td.write_episode(
            tmp_path, "x", dict(arrays, hist_uvz=arrays["hist_uvz"].astype(np.float64)), strings
        )
    with pytest.raises(ValueError, match="sample_caption"):
        td.write_episode(tmp_path, "x", arrays, dict(strings, sample_caption=[0]))
    assert not td.episode_done(tmp_path, "x")
    with pytest.raises(FileNotFoundError, match="mu0 extract"):
        td.TraceDataset(tmp_path)


def test_collate_gives_moving_points_their_share():
    """Of 40 points only 4 move: with moving_share 0.25 every one of them is kept among 16."""
    N, T, H = 40, 8, 32
    rng = np.random.default_rng(0)
    hist = np.zeros((N, T, 3), np.float32)
    hist[..., :2] = rng.uniform(-0.8, 0.8, (N, 1, 2))
    hist[..., 2] = 1.0
    future = np.repeat(hist[:, -1:], H, axis=1)
    movers = np.array([3, 11, 25, 38])
    future[movers, :, 0] += np.linspace(0, 0.3, H, dtype=np.float32)  # sideways, about 19 px
    item = {
        "point_mask": np.ones(N, bool),
        "hist_uvz": hist,
        "hist_valid": np.ones((N, T), bool),
        "future_uvz": future,
        "future_valid": np.ones((N, H), bool),
        "group_id": np.full(N, -1),
        "intrinsics": np.array([100.0, 100.0, 64.0, 64.0], np.float32),
        "image_size": np.array([128, 128]),
        "instruction": "lift",
        "rgb": np.zeros((8, 8, 3), np.uint8),
        "depth_m": None,
    }
    assert np.flatnonzero(td.moving_point_mask(item)).tolist() == movers.tolist()
    for seed in range(5):
        batch = td.collate_traces([item], 16, np.random.default_rng(seed), moving_share=0.25)
        kept_x = batch.hist_uvz[0, :, -1, 0].numpy()
        assert np.isin(hist[movers, -1, 0], kept_x).all()
    # Without a share, random subsets of 16 miss some of the 4 movers for some seed.
    missed = [
        not np.isin(
            hist[movers, -1, 0],
            td.collate_traces([item], 16, np.random.default_rng(s)).hist_uvz[0, :, -1, 0].numpy(),
        ).all()
        for s in range(5)
    ]
    assert any(missed)


def test_a_folder_of_datasets_is_expanded(tmp_path):
    from runtime.commands.pretrain import load_datasets

    _write(tmp_path / "traces" / "train" / "Lift-Panda", ids=("a", "b"))
    _write(tmp_path / "traces" / "Door-Panda", ids=("c",))
    found = td.find_datasets(tmp_path / "traces")
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "traces/Door-Panda",
        "traces/train/Lift-Panda",
    ]
    assert td.find_datasets(found[1]) == [found[1]]  # a dataset names itself only
    train, val = load_datasets([str(tmp_path / "traces")], val_episodes="b", exclude=None)
    assert len(train) == 2 * 4 and len(val) == 4  # a and c train (4 samples each), b validates
    with pytest.raises(ValueError, match="no training episode"):
        load_datasets([str(tmp_path / "traces")], val_episodes=None, exclude="Lift")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="mu0 extract"):
        td.find_datasets(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        td.find_datasets(tmp_path / "nowhere")


def test_eval_traces_finds_its_splits(tmp_path):
    from runtime.commands.eval_traces import discover_splits

    _write(tmp_path / "heldout_task" / "Door-Panda", ids=("a",))
    _write(tmp_path / "heldout_seeds" / "Lift-Panda", ids=("b",))
    _write(tmp_path / "train" / "Lift-Panda", ids=("c",))  # what the models learned from
    _write(tmp_path / "Stack-UR5e", ids=("d",))  # a dataset directly in the folder
    (tmp_path / "pictures").mkdir()
    splits = discover_splits(tmp_path)
    assert list(splits) == ["heldout_seeds", "Stack-UR5e", "heldout_task"]
    assert splits["Stack-UR5e"] == [tmp_path / "Stack-UR5e"]
    assert splits["heldout_task"] == [tmp_path / "heldout_task" / "Door-Panda"]
    assert discover_splits(tmp_path / "Stack-UR5e") == {"all": [tmp_path / "Stack-UR5e"]}


def test_eval_traces_end_to_end(tiny_model, tmp_path):
    """`mu0 eval-traces` on a folder of splits: a table per split, pictures, the --json headline
    at H=32; --examples 0 skips the pictures."""
    from mu0_core.checkpoint import save_checkpoint
    from runtime.cli import main

    _write(tmp_path / "data" / "heldout_seeds" / "lift", truth=True)
    _write(tmp_path / "data" / "heldout_seeds" / "stack", ids=("d",), truth=True)
    _write(tmp_path / "data" / "robot_out" / "lift", ids=("c",))
    ckpt = save_checkpoint(tiny_model, tmp_path / "ckpt")
    common = ["eval-traces", "--data", str(tmp_path / "data"), "--checkpoint", f"mu0={ckpt}"]
    common += ["--max-batches", "1", "--samples-k", "2", "--batch-size", "4"]
    out = tmp_path / "out"
    assert main([*common, "--out", str(out), "--examples", "1", "--json", str(out / "h.json")]) == 0
    h32 = json.loads((out / "h.json").read_text())
    assert {"static", "constant_velocity", "mu0", "labels"} <= set(h32)
    assert h32["mu0"]["ade3d_m"] > 0 and h32["mu0"]["fde3d_m"] >= 0
    assert list(h32["_splits"]) == ["heldout_seeds", "robot_out"]  # held-out seeds first
    # Scored against the truth there, with the label-scored figures beside; per pair too.
    seeds = h32["_splits"]["heldout_seeds"]
    assert seeds["static"]["scored_against_truth"] == 1.0
    assert seeds["static"]["ade3d_m_h32"] != seeds["static"]["label_ade3d_m_h32"]
    assert seeds["labels"]["ade3d_m_h32"] > 0
    assert sorted(h32["_pairs"]["heldout_seeds"]) == ["lift", "stack"]
    # Without truth (robot_out): against the labels, and no labels row.
    assert h32["_splits"]["robot_out"]["static"]["scored_against_truth"] == 0.0
    assert "labels" not in h32["_splits"]["robot_out"]
    assert "robot_out" in (out / "table.md").read_text()
    assert list((out / "heldout_seeds").glob("example_*.png"))

    quiet = tmp_path / "quiet"
    assert main([*common, "--out", str(quiet), "--examples", "0"]) == 0
    assert (quiet / "table.md").is_file()
    assert not list(quiet.glob("*/example_*.png"))
