"""Record scripted-demonstrator episodes as a LeRobot v3 dataset (written with pyarrow).

What one frame holds (camera ``<cam>``, H x W pixels):

    observation.images.<cam>            image (PNG bytes, RGB, row 0 at the top)
    observation.depth.<cam>             float32[H, W]  metres along the optical axis, lossless
    observation.intrinsics.<cam>        float32[4]     fx, fy, cx, cy (pixels)
    observation.T_world_cam.<cam>       float32[4, 4]  camera (OpenCV) -> world
    observation.state                   float32[D]     proprioception (env.proprio_layout())
    action                              float32[7]     OSC_POSE delta + gripper (-1 open, +1 close)
    observation.sim.body_pose           float32[B, 7]  every body's world position + quat wxyz
    observation.sim.eef_pose            float32[7]     the grip site's world position + quat wxyz
    observation.sim.points              float32[K, 3]  env.ground_truth_points(), world
    observation.sim.segmentation.<cam>  int32[H, W]    body id seen at each pixel (-1 none)
    next.success                        bool
    timestamp, frame_index, episode_index, index, task_index   (LeRobot's own columns)

The ``observation.sim.*`` features are the simulator's truth, kept for evaluating
TraceExtract (``mu0 bench extract``); extraction itself never reads them.

Atomicity: each finished episode goes to its own data file (``data/chunk-000/file-<i>.parquet``,
a valid v3 layout: LeRobot opens a new file when one is full, here one per episode), written to
a temporary name and renamed. The metadata (info, tasks, episodes, stats) is rebuilt from the
data files after every episode, also atomically, so an interrupted collection keeps every
finished episode, and running again resumes with the next seed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from envs import INSTRUCTIONS, MAX_EPISODE_STEPS
from mu0_core.extract import import_cv2
from mu0_core.extract.sources import (
    ACTION_KEY,
    BODY_POSE_KEY,
    CODEBASE_VERSION,
    DATA_PATH,
    EPISODES_PATH,
    INFO_PATH,
    STATE_KEY,
    STATS_PATH,
    TASKS_PATH,
    depth_key,
    import_pyarrow,
    intrinsics_key,
    pose_key,
    rgb_key,
    segmentation_key,
)
from mu0_core.trace_dataset import atomic_write_json

CHUNKS_SIZE = 1000  # files per chunk directory, as LeRobot
EPISODE_META_KEY = b"mu0_episode"  # parquet key-value metadata of each data file
ACTION_NAMES = ["dx", "dy", "dz", "dax", "day", "daz", "gripper"]
GRIPPER_ACTION_INDEX = 6


# With only_success, this many failed seeds in a row stop the collection with an error.
MAX_FAILED_IN_A_ROW = 20


@dataclass(frozen=True)
class CollectConfig:
    task: str = "Lift"
    robot: str = "Panda"
    episodes: int = 10
    seed: int = 0  # episode k of a fresh dataset uses seed + k
    image_size: tuple[int, int] = (128, 128)  # (height, width)
    camera: str | None = None  # default: the env's default camera for the task
    max_steps: int | None = None  # default: envs.MAX_EPISODE_STEPS[task]
    fps: int = 20
    only_success: bool = False  # drop episodes the demonstrator failed (the seed is still used)
    settle_steps: int = 10  # frames recorded after success holds, so motion ends in view


# ---------------------------------------------------------------------------
# Arrow encoding


def _list_column(values: np.ndarray, pa) -> Any:
    """numpy [rows, *shape] -> arrow column: fixed-size list for 1-D, nested lists beyond.

    Matches what HF datasets' ``Sequence(length=n)`` and ``Array2D`` features cast from.
    """
    rows, *shape = values.shape
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    if len(shape) == 1:
        return pa.FixedSizeListArray.from_arrays(flat, shape[0])
    arr = flat
    n = values.size
    for size in reversed(shape):
        n //= size
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * size)
        arr = pa.ListArray.from_arrays(offsets, arr)
    return arr


def _png_column(images: np.ndarray, pa) -> Any:
    cv2 = import_cv2()
    cells = []
    for img in images:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError("PNG encoding failed")
        cells.append({"bytes": buf.tobytes(), "path": None})
    return pa.array(cells, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


def _feature(dtype: str, shape: tuple[int, ...], names: Any = None) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "names": names}


def _hf_feature(ft: dict[str, Any]) -> dict[str, Any]:
    """HF datasets' JSON for a LeRobot feature, so `datasets` decodes the parquet by itself."""
    dtype, shape = ft["dtype"], tuple(ft["shape"])
    if dtype == "image":
        return {"_type": "Image"}
    if shape == (1,):
        return {"dtype": dtype, "_type": "Value"}
    if len(shape) == 1:
        return {
            "feature": {"dtype": dtype, "_type": "Value"},
            "length": shape[0],
            "_type": "Sequence",
        }
    return {"shape": list(shape), "dtype": dtype, "_type": f"Array{len(shape)}D"}


# ---------------------------------------------------------------------------
# Recording


class EpisodeRecorder:
    """Accumulates frames of one episode from a RobosuiteTraceEnv."""

    def __init__(self, env: Any, camera: str):
        self.env, self.camera = env, camera
        self.frames: dict[str, list[np.ndarray]] = {}

    def add(self, obs: dict[str, Any], action: np.ndarray, success: bool) -> None:
        env, cam = self.env, self.camera
        prefix = "" if cam == env.camera_names[0] else f"{cam}/"
        data, model = env.sim.data, env.sim.model
        H, W = env.image_hw
        seg = env.sim.render(camera_name=cam, height=H, width=W, segmentation=True)[::-1]
        import mujoco

        # Geom ids -> body ids; pixels that see no geom (the far background) get -1.
        is_geom = seg[..., 0] == mujoco.mjtObj.mjOBJ_GEOM
        body_id = np.where(is_geom, model.geom_bodyid[np.where(is_geom, seg[..., 1], 0)], -1)
        eef = env.T_world_eef()
        points = env.ground_truth_points()
        row = {
            rgb_key(cam): obs[prefix + "rgb"],
            depth_key(cam): obs[prefix + "depth_m"].astype(np.float32),
            intrinsics_key(cam): obs[prefix + "intrinsics"].astype(np.float32),
            pose_key(cam): obs[prefix + "T_world_cam"].astype(np.float32),
            STATE_KEY: obs["proprio"].astype(np.float32),
            ACTION_KEY: np.asarray(action, np.float32),
            BODY_POSE_KEY: np.concatenate([data.xpos, data.xquat], axis=1).astype(np.float32),
            "observation.sim.eef_pose": np.concatenate(
                [eef[:3, 3], _quat_wxyz(eef[:3, :3])]
            ).astype(np.float32),
            "observation.sim.points": np.stack(list(points.values())).astype(np.float32),
            segmentation_key(cam): body_id.astype(np.int32),
            "next.success": np.bool_(success),
        }
        for k, v in row.items():
            self.frames.setdefault(k, []).append(np.array(v, copy=True))

    def __len__(self) -> int:
        return len(self.frames.get(ACTION_KEY, []))


def _quat_wxyz(R: np.ndarray) -> np.ndarray:
    import mujoco

    q = np.zeros(4)
    mujoco.mju_mat2Quat(q, np.ascontiguousarray(R, dtype=np.float64).reshape(-1))
    return q


def features_for(env: Any, camera: str) -> dict[str, dict[str, Any]]:
    """The info.json ``features`` of a recording of this env and camera."""
    H, W = env.image_hw
    model = env.sim.model
    B = model.nbody
    layout = env.proprio_layout()
    state_names = [f"{name}_{i}" for name, sl in layout for i in range(sl.stop - sl.start)]
    point_names = list(env.ground_truth_points())
    return {
        rgb_key(camera): _feature("image", (H, W, 3), ["height", "width", "channels"]),
        depth_key(camera): _feature("float32", (H, W), ["height", "width"]),
        intrinsics_key(camera): _feature("float32", (4,), ["fx", "fy", "cx", "cy"]),
        pose_key(camera): _feature("float32", (4, 4), ["rows", "cols"]),
        STATE_KEY: _feature("float32", (len(state_names),), state_names),
        ACTION_KEY: _feature("float32", (7,), ACTION_NAMES),
        BODY_POSE_KEY: _feature(
            "float32",
            (B, 7),
            {
                "bodies": [model.body_id2name(i) for i in range(B)],
                "pose": ["x", "y", "z", "qw", "qx", "qy", "qz"],
            },
        ),
        "observation.sim.eef_pose": _feature(
            "float32", (7,), ["x", "y", "z", "qw", "qx", "qy", "qz"]
        ),
        "observation.sim.points": _feature(
            "float32", (len(point_names), 3), {"points": point_names, "xyz": ["x", "y", "z"]}
        ),
        segmentation_key(camera): _feature("int32", (H, W), ["height", "width"]),
        "next.success": _feature("bool", (1,)),
        "timestamp": _feature("float32", (1,)),
        "frame_index": _feature("int64", (1,)),
        "episode_index": _feature("int64", (1,)),
        "index": _feature("int64", (1,)),
        "task_index": _feature("int64", (1,)),
    }


def _episode_table(
    rec: EpisodeRecorder,
    features: dict[str, dict],
    episode_index: int,
    first_index: int,
    task_index: int,
    fps: int,
    episode_meta: dict[str, Any],
):
    pa, _ = import_pyarrow()
    F = len(rec)
    columns: dict[str, Any] = {}
    for key, frames in rec.frames.items():
        ft = features[key]
        values = np.stack(frames)
        if ft["dtype"] == "image":
            columns[key] = _png_column(values, pa)
        elif tuple(ft["shape"]) == (1,):
            columns[key] = pa.array(values.reshape(F))
        else:
            columns[key] = _list_column(values, pa)
    columns["timestamp"] = pa.array(np.arange(F, dtype=np.float32) / fps)
    columns["frame_index"] = pa.array(np.arange(F, dtype=np.int64))
    columns["episode_index"] = pa.array(np.full(F, episode_index, dtype=np.int64))
    columns["index"] = pa.array(first_index + np.arange(F, dtype=np.int64))
    columns["task_index"] = pa.array(np.full(F, task_index, dtype=np.int64))
    table = pa.table(columns)
    hf = {"info": {"features": {k: _hf_feature(features[k]) for k in table.column_names}}}
    return table.replace_schema_metadata(
        {
            b"huggingface": json.dumps(hf).encode(),
            EPISODE_META_KEY: json.dumps(episode_meta).encode(),
        }
    )


def _atomic_parquet(table: Any, path: Path) -> None:
    _, pq = import_pyarrow()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.chmod(tmp, 0o644)  # mkstemp makes files private; datasets are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------
# Dataset-level metadata, rebuilt from the data files


def finished_episodes(root: str | Path) -> list[dict[str, Any]]:
    """Per-episode metadata of every finished data file, in episode order."""
    _, pq = import_pyarrow()
    metas = []
    for path in sorted(Path(root).glob("data/chunk-*/file-*.parquet")):
        kv = pq.read_schema(path).metadata or {}
        if EPISODE_META_KEY in kv:
            metas.append(json.loads(kv[EPISODE_META_KEY]))
    return sorted(metas, key=lambda m: m["episode_index"])


def _merge_stats(per_episode: list[dict[str, dict[str, list]]]) -> dict[str, dict[str, Any]]:
    """Pool per-episode min/max/mean/std/count into dataset stats (exact for mean and std)."""
    out: dict[str, dict[str, Any]] = {}
    for key in per_episode[0] if per_episode else []:
        parts = [s[key] for s in per_episode if key in s]
        count = np.array([p["count"][0] for p in parts], dtype=np.float64)
        mean = np.stack([np.asarray(p["mean"], np.float64) for p in parts])
        std = np.stack([np.asarray(p["std"], np.float64) for p in parts])
        w = (count / count.sum()).reshape(-1, *([1] * (mean.ndim - 1)))
        pooled_mean = (w * mean).sum(0)
        pooled_var = (w * (std**2 + (mean - pooled_mean) ** 2)).sum(0)
        out[key] = {
            "min": np.min([np.asarray(p["min"]) for p in parts], axis=0).tolist(),
            "max": np.max([np.asarray(p["max"]) for p in parts], axis=0).tolist(),
            "mean": pooled_mean.tolist(),
            "std": np.sqrt(pooled_var).tolist(),
            "count": [int(count.sum())],
        }
    return out


def _episode_stats(rec: EpisodeRecorder, features: dict[str, dict]) -> dict[str, dict[str, list]]:
    """LeRobot-style stats of one episode: per-dimension for vectors, per-channel for images."""
    stats = {}
    for key, frames in rec.frames.items():
        ft = features[key]
        x = np.stack(frames)
        if ft["dtype"] == "image":
            x = x.astype(np.float64).reshape(-1, 3) / 255.0  # channels, [0, 1], shape [3, 1, 1]
            shape = (3, 1, 1)
        elif ft["dtype"] in ("float32", "float64") and len(ft["shape"]) == 1:
            x, shape = x.astype(np.float64), (ft["shape"][0],)
        elif key.startswith("observation.depth"):
            x, shape = x.astype(np.float64).reshape(-1, 1), (1,)
        else:
            continue
        stats[key] = {
            "min": x.min(0).reshape(shape).tolist(),
            "max": x.max(0).reshape(shape).tolist(),
            "mean": x.mean(0).reshape(shape).tolist(),
            "std": x.std(0).reshape(shape).tolist(),
            "count": [len(frames)],
        }
    return stats


def _tasks_table(tasks: list[str], pa):
    """tasks.parquet as pandas writes ``DataFrame({"task_index": ...}, index=tasks)``."""
    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [
            {
                "name": None,
                "field_name": None,
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": {"encoding": "UTF-8"},
            }
        ],
        "columns": [
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
            {
                "name": None,
                "field_name": "__index_level_0__",
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": None,
            },
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.0",
    }
    table = pa.table(
        {
            "task_index": pa.array(np.arange(len(tasks), dtype=np.int64)),
            "__index_level_0__": pa.array(tasks, pa.string()),
        }
    )
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


def write_dataset_meta(
    root: str | Path, features: dict[str, dict], fps: int, robot_type: str
) -> dict:
    """Rebuild meta/ (info, tasks, episodes, stats) from the finished data files; return info."""
    pa, _ = import_pyarrow()
    root = Path(root)
    metas = finished_episodes(root)
    tasks = sorted(
        {m["task_string"] for m in metas},
        key=lambda t: min(m["task_index"] for m in metas if m["task_string"] == t),
    )
    total_frames = sum(m["length"] for m in metas)
    rows = {
        "episode_index": [m["episode_index"] for m in metas],
        "tasks": [[m["task_string"]] for m in metas],
        "length": [m["length"] for m in metas],
        "data/chunk_index": [m["chunk_index"] for m in metas],
        "data/file_index": [m["file_index"] for m in metas],
        "dataset_from_index": [m["first_index"] for m in metas],
        "dataset_to_index": [m["first_index"] + m["length"] for m in metas],
        "meta/episodes/chunk_index": [0] * len(metas),
        "meta/episodes/file_index": [0] * len(metas),
        "extra": [json.dumps(m["extra"]) for m in metas],
    }
    episodes = pa.table(
        {
            k: pa.array(
                v,
                pa.list_(pa.string())
                if k == "tasks"
                else (pa.string() if k == "extra" else pa.int64()),
            )
            for k, v in rows.items()
        }
    )
    _atomic_parquet(episodes, root / EPISODES_PATH.format(chunk_index=0, file_index=0))
    _atomic_parquet(_tasks_table(tasks, pa), root / TASKS_PATH)
    atomic_write_json(root / STATS_PATH, _merge_stats([m["stats"] for m in metas]))
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": robot_type,
        "total_episodes": len(metas),
        "total_frames": total_frames,
        "total_tasks": len(tasks),
        "chunks_size": CHUNKS_SIZE,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 500,
        "fps": fps,
        "splits": {"train": f"0:{len(metas)}"},
        "data_path": DATA_PATH,
        "video_path": None,
        "features": features,
    }
    atomic_write_json(root / INFO_PATH, info)
    return info


# ---------------------------------------------------------------------------
# The collection loop


# One episode: (env, seed, recorder) -> (success, extra metadata), or None when the episode
# is not to be kept. It resets the env itself and records every frame it wants kept.
Rollout = Callable[[Any, int, "EpisodeRecorder"], "tuple[bool, dict[str, Any]] | None"]


def demonstrator_rollout(task: str, max_steps: int, settle_steps: int = 10) -> Rollout:
    """The task's scripted demonstrator from the reset to success (+ ``settle_steps``)."""
    from envs.demos import make_demonstrator

    demo = make_demonstrator(task)

    def rollout(env: Any, seed: int, rec: EpisodeRecorder) -> tuple[bool, dict[str, Any]]:
        obs, info = env.reset(seed=seed)
        demo.reset()
        success_streak, success = 0, False
        for _ in range(max_steps):
            action = demo(env)
            rec.add(obs, action, bool(info.get("success", False)))
            obs, _, _, _, info = env.step(action)
            success = bool(info["success"])
            success_streak = success_streak + 1 if success else 0
            if success_streak >= settle_steps:
                break
        return success, {}

    return rollout


def collect(
    out_dir: str | Path,
    config: CollectConfig,
    progress: bool = True,
    env: Any = None,
    rollout: Rollout | None = None,
) -> dict[str, Any]:
    """Record ``config.episodes`` episodes into ``out_dir`` (resuming what is there).

    ``rollout`` plays each episode (default: the task's scripted demonstrator); what it
    returns besides success goes into the episode's ``extra`` metadata.
    Returns a summary {"episodes", "new", "frames", "success_rate", "path", "skipped"}, where
    ``skipped`` counts the seeds of this run not kept: ``declined`` (the rollout returned
    None) and ``failed`` (with ``only_success``).
    """
    from tqdm.auto import tqdm

    from envs.robosuite_env import RobosuiteTraceEnv

    root = Path(out_dir)
    done = finished_episodes(root)
    if done:
        extra = done[0]["extra"]
        if (extra["task"], extra["robot"]) != (config.task, config.robot):
            raise ValueError(
                f"{root} holds {extra['task']}/{extra['robot']} episodes; "
                f"collect {config.task}/{config.robot} into another directory"
            )
    own_env = env is None
    if own_env:
        env = RobosuiteTraceEnv(
            config.task,
            config.robot,
            camera_names=config.camera,
            image_size=config.image_size,
            control_freq=config.fps,
        )
    camera = config.camera or env.camera_names[0]
    features = features_for(env, camera)
    max_steps = config.max_steps or MAX_EPISODE_STEPS[config.task]
    if rollout is None:
        rollout = demonstrator_rollout(config.task, max_steps, config.settle_steps)
    instruction = INSTRUCTIONS[config.task]
    next_seed = max((m["extra"]["seed"] for m in done), default=config.seed - 1) + 1
    first_index = sum(m["length"] for m in done)
    if done:  # a run stopped between a data file and its metadata: catch the metadata up
        write_dataset_meta(root, features, config.fps, config.robot)
    new = 0
    failed_in_a_row = 0
    skipped = {"declined": 0, "failed": 0}
    bar = tqdm(
        total=config.episodes,
        initial=min(len(done), config.episodes),
        desc="collect",
        unit="ep",
        disable=not progress,
    )
    try:
        while len(done) < config.episodes:
            seed, next_seed = next_seed, next_seed + 1
            rec = EpisodeRecorder(env, camera)
            played = rollout(env, seed, rec)
            success, extra = played if played is not None else (False, {})
            if played is None or (config.only_success and not success):
                skipped["declined" if played is None else "failed"] += 1
                failed_in_a_row += 1
                bar.set_postfix(skipped_seed=seed)
                if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                    # A demonstrator that cannot do the task would otherwise loop forever.
                    raise RuntimeError(
                        f"collect {config.task}/{config.robot}: no episode to keep in "
                        f"{failed_in_a_row} seeds in a row (up to seed {seed}); "
                        f"the {len(done)} finished episodes are kept"
                    )
                continue
            failed_in_a_row = 0
            index = len(done)
            meta = {
                "episode_index": index,
                "length": len(rec),
                "first_index": first_index,
                "chunk_index": index // CHUNKS_SIZE,
                "file_index": index % CHUNKS_SIZE,
                "task_index": 0,
                "task_string": instruction,
                "stats": _episode_stats(rec, features),
                "extra": {
                    "task": config.task,
                    "robot": config.robot,
                    "seed": seed,
                    "success": success,
                    "camera": camera,
                    "gripper_action_index": GRIPPER_ACTION_INDEX,
                    "up_world": [0.0, 0.0, 1.0],
                    **extra,
                },
            }
            table = _episode_table(rec, features, index, first_index, 0, config.fps, meta)
            path = root / DATA_PATH.format(
                chunk_index=meta["chunk_index"], file_index=meta["file_index"]
            )
            _atomic_parquet(table, path)
            done.append(meta)
            first_index += len(rec)
            new += 1
            write_dataset_meta(root, features, config.fps, config.robot)
            bar.update(1)
    finally:
        bar.close()
        if own_env:
            env.close()
    return {
        "episodes": len(done),
        "new": new,
        "frames": sum(m["length"] for m in done),
        "success_rate": float(np.mean([m["extra"]["success"] for m in done])) if done else 0.0,
        "path": str(root),
        "skipped": skipped,
    }
