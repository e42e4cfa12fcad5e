"""Training data of an action expert: recorded episodes + the frozen μ0's traces on them.

For every kept frame t of a LeRobot v3 recording (``mu0 collect``), the queries are built
exactly as at run time (``policies.queries.QueryBuilder``: the gripper with its recorded
history, scene points from the pixels), the frozen μ0 predicts their traces, and the sample
keeps those predicted traces (in the robot base frame), the query points' colours, the
proprioception, the instruction and the recorded action chunk a[t : t + chunk] (padded past
the end, with a mask), plus where the gripper is when its motion segment ends (``goal``,
``goal_rot``: the expert's auxiliary target, read off the recorded proprioception). Ground-truth
future traces are never used. In a recovery recording (the expert drove, then the scripted
demonstrator took over: ``mu0 collect --expert``) only the demonstrator's frames are kept.
Predictions are cached per (episode, μ0 checkpoint hash, stride) in one safetensors file, so
retraining an expert costs no μ0 call.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from policies.queries import QueryBuilder, point_colors, traces_to_base


def _T_world_base(source, episode) -> np.ndarray:
    """The robot base pose from the recording's simulator body poses (fixed over an episode)."""
    sim = episode.sim
    if sim is None or "robot0_base" not in sim.body_names:
        raise ValueError(f"{source.root}/{episode.id}: no robot0_base pose recorded")
    pose = sim.body_pose[0, sim.body_names.index("robot0_base")].astype(np.float64)
    w, x, y, z = pose[3:] / np.linalg.norm(pose[3:])
    T = np.eye(4)
    T[:3, :3] = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    T[:3, 3] = pose[:3]
    return T


def _state_actions(source, episode_id: str) -> tuple[np.ndarray, np.ndarray]:
    from mu0_core.extract.sources import ACTION_KEY, STATE_KEY, column_to_numpy, import_pyarrow

    _, pq = import_pyarrow()
    index = int(episode_id.rsplit("_", 1)[-1])
    row = source._episodes[index]
    path = source.root / source.info["data_path"].format(
        chunk_index=int(row["data/chunk_index"]), file_index=int(row["data/file_index"])
    )
    table = pq.read_table(path, columns=[STATE_KEY, ACTION_KEY, "episode_index", "frame_index"])
    table = table.filter(table.column("episode_index").to_numpy() == index).sort_by("frame_index")
    D = tuple(source.features[STATE_KEY]["shape"])
    state = column_to_numpy(table.column(STATE_KEY), D, np.float32)
    actions = column_to_numpy(table.column(ACTION_KEY), (7,), np.float32)
    return state, actions


def first_kept_frame(source, episode_id: str) -> int:
    """The first frame whose action is a demonstrator's: 0, or in a recovery recording
    (``mu0 collect --expert``) the frame where the demonstrator took over from the expert."""
    row = source._episodes[int(episode_id.rsplit("_", 1)[-1])]
    return int((row.get("extra") or {}).get("handover_frame", 0))


def episode_queries(
    source, episode_id: str, stride: int = 2, num_scene_points: int = 32
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """The trace requests of a recorded episode, one every ``stride`` frames from its first
    kept frame, built as the control loop builds them, with each frame's ``T_base_cam``."""
    ep = source.load(episode_id)
    state, _ = _state_actions(source, episode_id)
    T_base_world = np.linalg.inv(_T_world_base(source, ep))
    first = first_kept_frame(source, episode_id)
    qb = QueryBuilder(num_scene_points)
    obs_list, T_list = [], []
    for t in range(ep.num_frames):
        qb.observe(state[t, :3])  # the history includes the frames before the first kept
        if t < first or (t - first) % stride:
            continue
        T_base_cam = T_base_world @ ep.T_world_cam[t].astype(np.float64)
        obs_list.append(
            qb.build(ep.rgb[t], ep.depth_m[t], ep.intrinsics[t], T_base_cam, ep.instruction)
        )
        T_list.append(T_base_cam)
    return obs_list, T_list


def episode_samples(
    source,
    episode_id: str,
    trace_model,
    chunk: int,
    stride: int = 2,
    num_scene_points: int = 32,
    batch: int = 16,
) -> dict[str, np.ndarray]:
    """One recorded episode → arrays of expert samples (see the module docstring)."""
    state, actions = _state_actions(source, episode_id)
    obs_list, T_list = episode_queries(source, episode_id, stride, num_scene_points)
    first = first_kept_frame(source, episode_id)
    frames = list(range(first, first + stride * len(obs_list), stride))
    traces = []
    for i in range(0, len(obs_list), batch):
        preds = trace_model.predict_batch(obs_list[i : i + batch])
        for k, p in enumerate(preds):
            traces.append(traces_to_base(p["traces_xyz_cam"], T_list[i + k]))
    S = len(frames)
    chunks = np.zeros((S, chunk, 7), np.float32)
    mask = np.zeros((S, chunk), bool)
    for i, t in enumerate(frames):
        a = actions[t : t + chunk]
        chunks[i, : len(a)] = a
        chunks[i, len(a) :, 6] = actions[-1, 6]  # past the end: hold still, keep the gripper
        mask[i, : len(a)] = True
    return {
        "traces": np.stack(traces).astype(np.float16),
        "trace_valid": np.ones((S, traces[0].shape[0]), bool),
        "proprio": state[frames],
        "actions": chunks,
        "action_mask": mask,
        "instruction": np.array([obs_list[0]["instruction"]] * S),
        "point_rgb": np.stack([point_colors(o) for o in obs_list]).astype(np.float16),
    }


def build_expert_dataset(
    episode_dirs: list[Path],
    trace_model,
    cache_dir: Path,
    chunk: int,
    stride: int = 2,
    num_scene_points: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """All episodes of the given recordings → one dict of stacked arrays (+ "instructions")."""
    from mu0_core.extract.sources import LeRobotV3Source

    meta = trace_model.metadata()
    key = meta.get("model_hash", "model")[:16]
    if meta.get("noise_scale") is not None:  # the sampler's temperature changes the traces
        key += f"-n{meta['noise_scale']:g}"
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for d in episode_dirs:
        src = LeRobotV3Source(d)
        jobs += [(src, eid) for eid in src.episode_ids()]
    parts: list[dict[str, np.ndarray]] = []
    bar = tqdm(jobs, desc="μ0 traces for expert data", disable=not progress, unit="ep")
    for src, eid in bar:
        # Recordings in different folders may share a name (and episode ids): key on the path.
        root = Path(src.root).resolve()
        where = hashlib.sha256(str(root).encode()).hexdigest()[:8]
        name = f"{root.name}-{where}-{eid}-{key}-s{stride}-q{num_scene_points}-c{chunk}"
        f = cache_dir / f"{name}.safetensors"
        if f.is_file():
            arrs = load_file(str(f))
            instr = json.loads((cache_dir / f"{name}.json").read_text())["instruction"]
            if "point_rgb" not in arrs:  # cached before colours were kept: no μ0 call needed
                obs_list, _ = episode_queries(src, eid, stride, num_scene_points)
                arrs["point_rgb"] = np.stack([point_colors(o) for o in obs_list]).astype(np.float16)
                _save_cache(f, arrs, instr)
            arrs["instruction"] = np.array([instr] * len(arrs["proprio"]))
        else:
            arrs = episode_samples(src, eid, trace_model, chunk, stride, num_scene_points)
            _save_cache(f, arrs, str(arrs["instruction"][0]))
        parts.append(arrs)
    if not parts:
        raise ValueError(f"no episodes in {[str(d) for d in episode_dirs]}")
    dims = {p["proprio"].shape[1] for p in parts}
    if len(dims) != 1:
        raise ValueError(
            f"recordings mix robots (proprio sizes {sorted(dims)}): one robot per expert"
        )
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    # The index of each sample's episode's first sample (traces may be taken from earlier
    # samples of the same episode, never across episodes).
    lengths = [len(p["proprio"]) for p in parts]
    starts = np.cumsum([0, *lengths[:-1]])
    out["episode_start"] = np.repeat(starts, lengths)
    # Auxiliary targets (policies.base): the gripper's pose where its motion segment ends.
    ends = segment_ends(out["actions"][:, 0, 6], out["episode_start"])
    out["goal"] = out["proprio"][ends, :3]
    out["goal_rot"] = rotation_between(out["proprio"][:, 3:7], out["proprio"][ends, 3:7])
    out["instructions"] = sorted(set(out["instruction"].tolist()))
    return out


def _save_cache(f: Path, arrs: dict[str, np.ndarray], instruction: str) -> None:
    tmp = f.with_suffix(".tmp")
    save_file({k: v for k, v in arrs.items() if k != "instruction"}, str(tmp))
    tmp.replace(f)
    f.with_suffix(".json").write_text(json.dumps({"instruction": instruction}))


def segment_ends(gripper: np.ndarray, episode_start: np.ndarray) -> np.ndarray:
    """The sample that ends each sample's motion segment: the next sample of the same episode
    whose gripper command has the other sign (it opens or closes there), or the episode's
    last sample. gripper [S], episode_start [S] → int [S]."""
    S = len(gripper)
    ends = np.empty(S, np.int64)
    stops = np.append(np.flatnonzero(np.diff(episode_start)) + 1, S)  # one past each episode
    for start, stop in zip(np.unique(episode_start), stops):
        nxt = stop - 1  # walking back: the sample that ends the current segment
        for i in range(stop - 1, start - 1, -1):
            if i + 1 < stop and np.sign(gripper[i + 1]) != np.sign(gripper[i]):
                nxt = i + 1
            ends[i] = nxt
    return ends


def rotation_between(q_from: np.ndarray, q_to: np.ndarray) -> np.ndarray:
    """Rotation vectors (base frame, rad) taking orientations ``q_from`` to ``q_to``
    (quaternions xyzw [S, 4]): the axis-angle of q_to ⊗ q_from⁻¹, angle in [0, π]."""
    v1, w1 = -q_from[:, :3], q_from[:, 3]  # the inverse of a unit quaternion
    v2, w2 = q_to[:, :3], q_to[:, 3]
    w = w2 * w1 - (v2 * v1).sum(-1)
    v = w2[:, None] * v1 + w1[:, None] * v2 + np.cross(v2, v1)
    v = np.where(w[:, None] < 0, -v, v)  # the shorter way round
    norm = np.linalg.norm(v, axis=-1)
    angle = 2 * np.arctan2(norm, np.abs(w))
    return (v * (angle / np.maximum(norm, 1e-12))[:, None]).astype(np.float32)


def lagged_indices(
    idx: np.ndarray, episode_start: np.ndarray, max_lag: int, rng: np.random.Generator
) -> np.ndarray:
    """For samples ``idx``, samples up to ``max_lag`` earlier in the same episode (uniform)."""
    lag = rng.integers(0, max_lag + 1, size=len(idx))
    return np.maximum(idx - lag, episode_start[idx])


def to_tensors(
    data: dict[str, Any],
    idx: np.ndarray,
    instructions: list[str],
    device,
    trace_idx: np.ndarray | None = None,
) -> dict:
    """Samples ``idx`` as tensors; their traces from samples ``trace_idx`` (default: the same)."""
    ids = np.array([instructions.index(s) for s in data["instruction"][idx]])
    tr = idx if trace_idx is None else trace_idx
    extra = {}
    for key in ("goal", "goal_rot"):
        if key in data:
            extra[key] = torch.from_numpy(data[key][idx].astype(np.float32)).to(device)
    if "point_rgb" in data:  # the colours of the points whose traces these are
        extra["point_rgb"] = torch.from_numpy(data["point_rgb"][tr].astype(np.float32)).to(device)
    return {
        **extra,
        "traces": torch.from_numpy(data["traces"][tr].astype(np.float32)).to(device),
        "trace_valid": torch.from_numpy(data["trace_valid"][tr]).to(device),
        "proprio": torch.from_numpy(data["proprio"][idx]).to(device),
        "instruction_ids": torch.from_numpy(ids).to(device),
        "actions": torch.from_numpy(data["actions"][idx]).to(device),
        "action_mask": torch.from_numpy(data["action_mask"][idx]).to(device),
    }
