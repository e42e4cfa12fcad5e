"""The trace dataset that TraceExtract writes and pretraining reads.

On disk, a directory::

    meta.json                   format, version, window sizes, episode list, source, report
    episodes/<id>.safetensors   frames (rgb, depth_m, intrinsics, T_world_cam) and samples
    episodes/<id>.json          strings: instruction, segment captions, per-sample caption index

One *sample* is a frame t of an episode with N query points: their 8-step history and
32-step future (by default the next 32 frames as they happened; meta.json's
``report.config`` says how the futures were cut), both in frame t's camera as normalised
uv + depth in metres (``mu0_core.types`` conventions).

Arrays of one episode (F frames, S samples, N points):

    rgb            uint8[F, H, W, 3]
    depth_m        float32[F, H, W]          0 = unknown
    intrinsics     float32[F, 4]             fx, fy, cx, cy (pixels)
    T_world_cam    float32[F, 4, 4]          camera (OpenCV) -> world
    sample_frame   int64[S]                  the frame t of each sample
    hist_uvz       float32[S, N, 8, 3]       absolute, frame t's camera; last step = position at t
    hist_valid     bool[S, N, 8]
    future_uvz     float32[S, N, 32, 3]      frame t's camera; step 0 = position at t
    future_valid   bool[S, N, 32]            False from the step a track is lost on
    point_mask     bool[S, N]                False = padding
    group_id       int64[S, N]               rigid-group id from motion clustering, -1 unknown
    moving         bool[S, N]
    sample_segment int64[S]
    gt_future_uvz  float32[S, N, 32, 3]      optional: the simulator's truth for the same points
    gt_future_valid bool[S, N, 32]           with it: where that truth is known
    gt_part        uint8[S, N]               with it: 0 scene, 1 arm, 2 gripper, 3 object

Writes are atomic (a temporary file renamed into place), so an interrupted extraction never
leaves a half-written episode; reading is lazy (``safe_open`` per item, slicing one frame and
one sample). No pickle anywhere: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mu0_core.types import HISTORY_STEPS, HORIZON, TraceBatch

# Arrays stored per sample and per point ([S, N, ...]); the last one only when the
# episode came with the simulator's ground truth.
PER_POINT_KEYS = (
    "hist_uvz",
    "hist_valid",
    "future_uvz",
    "future_valid",
    "point_mask",
    "group_id",
    "moving",
    "gt_future_uvz",
    "gt_future_valid",
    "gt_part",
)

FORMAT = "mu0-traces"
# 2: futures are a fixed time window (lost steps invalid), with gt_future_valid.
VERSION = 2
META_FILE = "meta.json"
EPISODES_DIR = "episodes"

# Arrays every episode must carry, with their dtypes; shapes are checked in `_check_arrays`.
REQUIRED_ARRAYS: dict[str, np.dtype] = {
    "rgb": np.dtype(np.uint8),
    "depth_m": np.dtype(np.float32),
    "intrinsics": np.dtype(np.float32),
    "T_world_cam": np.dtype(np.float32),
    "sample_frame": np.dtype(np.int64),
    "hist_uvz": np.dtype(np.float32),
    "hist_valid": np.dtype(bool),
    "future_uvz": np.dtype(np.float32),
    "future_valid": np.dtype(bool),
    "point_mask": np.dtype(bool),
    "group_id": np.dtype(np.int64),
    "moving": np.dtype(bool),
    "sample_segment": np.dtype(np.int64),
}
OPTIONAL_ARRAYS: dict[str, np.dtype] = {
    "gt_future_uvz": np.dtype(np.float32),
    "gt_future_valid": np.dtype(bool),
    "gt_part": np.dtype(np.uint8),
}


# ---------------------------------------------------------------------------
# Writing


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; datasets are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def _check_arrays(episode_id: str, arrays: dict[str, np.ndarray]) -> None:
    missing = sorted(REQUIRED_ARRAYS.keys() - arrays.keys())
    unknown = sorted(arrays.keys() - REQUIRED_ARRAYS.keys() - OPTIONAL_ARRAYS.keys())
    if missing or unknown:
        raise ValueError(
            f"episode {episode_id}: missing arrays {missing}, unknown arrays {unknown}"
        )
    for key, dtype in {**REQUIRED_ARRAYS, **OPTIONAL_ARRAYS}.items():
        if key in arrays and np.asarray(arrays[key]).dtype != dtype:
            raise ValueError(
                f"episode {episode_id}: {key} must be {dtype}, got {np.asarray(arrays[key]).dtype}"
            )
    F, H, W, _ = arrays["rgb"].shape
    S, N, T_hist, _ = arrays["hist_uvz"].shape
    horizon = arrays["future_uvz"].shape[2]
    expected = {
        "rgb": (F, H, W, 3),
        "depth_m": (F, H, W),
        "intrinsics": (F, 4),
        "T_world_cam": (F, 4, 4),
        "sample_frame": (S,),
        "hist_uvz": (S, N, T_hist, 3),
        "hist_valid": (S, N, T_hist),
        "future_uvz": (S, N, horizon, 3),
        "future_valid": (S, N, horizon),
        "point_mask": (S, N),
        "group_id": (S, N),
        "moving": (S, N),
        "sample_segment": (S,),
        "gt_future_uvz": (S, N, horizon, 3),
        "gt_future_valid": (S, N, horizon),
        "gt_part": (S, N),
    }
    for key, shape in expected.items():
        if key in arrays and tuple(arrays[key].shape) != shape:
            raise ValueError(
                f"episode {episode_id}: {key} has shape {tuple(arrays[key].shape)}, expected {shape}"
            )
    if S and (arrays["sample_frame"].min() < 0 or arrays["sample_frame"].max() >= F):
        raise ValueError(f"episode {episode_id}: sample_frame outside [0, {F})")


def episode_paths(directory: str | Path, episode_id: str) -> tuple[Path, Path]:
    """(safetensors path, json path) of one episode."""
    if not episode_id or "/" in episode_id or episode_id.startswith("."):
        raise ValueError(f"episode id {episode_id!r} must be a non-empty file name")
    root = Path(directory) / EPISODES_DIR
    return root / f"{episode_id}.safetensors", root / f"{episode_id}.json"


def episode_done(directory: str | Path, episode_id: str) -> bool:
    """True when both files of an episode are in place (the safetensors file is written last)."""
    tensors, strings = episode_paths(directory, episode_id)
    return tensors.exists() and strings.exists()


def write_episode(
    directory: str | Path, episode_id: str, arrays: dict[str, np.ndarray], strings: dict[str, Any]
) -> None:
    """Write one episode atomically: ``episodes/<id>.json`` first, then ``<id>.safetensors``.

    strings: JSON-able; must hold "instruction" (str), "captions" (list[str], one per motion
    segment) and "sample_caption" (list[int], one per sample, indexing "captions").
    """
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    _check_arrays(episode_id, arrays)
    S = arrays["sample_frame"].shape[0]
    for key in ("instruction", "captions", "sample_caption"):
        if key not in strings:
            raise ValueError(f"episode {episode_id}: strings need {key!r}")
    if len(strings["sample_caption"]) != S:
        raise ValueError(
            f"episode {episode_id}: sample_caption has {len(strings['sample_caption'])} entries, "
            f"expected one per sample ({S})"
        )
    tensors_path, json_path = episode_paths(directory, episode_id)
    # The safetensors file is the "done" marker, so it goes last; a crash in between leaves
    # only a JSON file, which `episode_done` ignores and the next run overwrites.
    atomic_write_json(json_path, strings)
    atomic_write_bytes(tensors_path, save(arrays, metadata={"format": FORMAT}))


def write_meta(
    directory: str | Path,
    episodes: list[dict[str, Any]],
    source: str,
    report: dict[str, Any] | None = None,
    history_steps: int = HISTORY_STEPS,
    horizon: int = HORIZON,
) -> dict[str, Any]:
    """Write ``meta.json`` atomically and return it.

    episodes: [{"id", "task", "robot" (str or None), "instruction", "num_frames", "num_samples"}].
    """
    keys = {"id", "task", "robot", "instruction", "num_frames", "num_samples"}
    for e in episodes:
        if not keys <= e.keys():
            raise ValueError(f"episode entry {e.get('id')!r} lacks {sorted(keys - e.keys())}")
    ids = [e["id"] for e in episodes]
    if len(set(ids)) != len(ids):
        raise ValueError("episode ids must be unique")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "history_steps": int(history_steps),
        "horizon": int(horizon),
        "episodes": [{k: e[k] for k in sorted(keys)} for e in episodes],
        "source": source,
        "report": report or {},
    }
    atomic_write_json(Path(directory) / META_FILE, meta)
    return meta


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {directory} a trace dataset (mu0 extract)?")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}: extract it again with `mu0 extract`"
        )
    return meta


def find_datasets(path: str | Path) -> list[Path]:
    """``path`` if it is a trace dataset, else every trace dataset below it (sorted), so a
    folder such as ``data/traces`` holding ``train/Lift-Panda``, ... can be named at once."""
    root = Path(path)
    if (root / META_FILE).is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist")
    found = sorted(m.parent for m in root.rglob(META_FILE))
    if not found:
        raise FileNotFoundError(
            f"no trace dataset (a folder with {META_FILE}) in {root}: run `mu0 extract` first"
        )
    return found


# ---------------------------------------------------------------------------
# Reading


class TraceDataset(torch.utils.data.Dataset):
    """Samples of a trace dataset directory, one frame and its query points per item.

    Lazy: the constructor reads only ``meta.json`` and the episodes' JSON files; each
    item opens the episode's safetensors file and slices one frame and one sample, so
    DataLoader workers share nothing but paths.
    """

    def __init__(self, path: str | Path, episodes: list[str] | None = None):
        self.root = Path(path)
        self.meta = read_meta(self.root)
        by_id = {e["id"]: e for e in self.meta["episodes"]}
        if episodes is not None:
            unknown = [e for e in episodes if e not in by_id]
            if unknown:
                raise KeyError(f"episodes {unknown} not in {self.root / META_FILE}")
            by_id = {e: by_id[e] for e in episodes}
        self.episodes: list[dict[str, Any]] = list(by_id.values())
        self._strings = {}
        for e in self.episodes:
            _, json_path = episode_paths(self.root, e["id"])
            self._strings[e["id"]] = json.loads(json_path.read_text())
        counts = np.array([e["num_samples"] for e in self.episodes], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])  # [E + 1]

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, i: int) -> tuple[str, int]:
        """(episode id, sample index within it) of item i."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        e = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return self.episodes[e]["id"], int(i - self._offsets[e])

    def __getitem__(self, i: int) -> dict[str, Any]:
        from safetensors import safe_open

        episode_id, s = self.locate(int(i))
        tensors_path, _ = episode_paths(self.root, episode_id)
        strings = self._strings[episode_id]
        with safe_open(str(tensors_path), framework="numpy") as f:
            t = int(f.get_slice("sample_frame")[s : s + 1][0])
            item = {
                "rgb": f.get_slice("rgb")[t],
                "depth_m": f.get_slice("depth_m")[t],
                "intrinsics": f.get_slice("intrinsics")[t],
            }
            stored = set(f.keys())
            for key in PER_POINT_KEYS:
                if key in stored:  # gt_future_uvz only where the simulator's truth was known
                    item[key] = f.get_slice(key)[s]
            segment = int(f.get_slice("sample_segment")[s : s + 1][0])
        H, W = item["rgb"].shape[:2]
        item["image_size"] = np.array([W, H], dtype=np.int64)
        item["instruction"] = strings["instruction"]
        item["caption"] = strings["captions"][strings["sample_caption"][s]]
        item["episode"] = episode_id
        item["frame"] = t
        item["segment"] = segment
        return item


def moving_point_mask(item: dict[str, Any], uv_thresh: float = 0.04, z_thresh_m: float = 0.02):
    """bool[N]: points whose true future leaves their current position by more than
    ``uv_thresh`` (normalised image units; 0.04 is about 2.5 px at 128 px) or ``z_thresh_m``."""
    cur = np.asarray(item["hist_uvz"])[:, -1:, :]
    d = np.abs(np.asarray(item["future_uvz"]) - cur)
    d = np.where(np.asarray(item["future_valid"], dtype=bool)[..., None], d, 0.0)
    uv = np.linalg.norm(d[..., :2], axis=-1).max(-1)
    return (uv > uv_thresh) | (d[..., 2].max(-1) > z_thresh_m)


def collate_traces(
    items: list[dict[str, Any]],
    max_points: int | None = None,
    rng: np.random.Generator | None = None,
    moving_share: float = 0.0,
) -> TraceBatch:
    """Items (``TraceDataset.__getitem__``) -> a ``TraceBatch`` padded to one point count N.

    Each item keeps its real points (``point_mask``); where more than ``max_points`` remain,
    a random subset (``rng``, default a fresh generator) is kept, in which up to
    ``moving_share`` of the slots go to points that move (``moving_point_mask``) first.
    N is the largest count left. Images must share one size: resize upstream.
    """
    if not items:
        raise ValueError("collate_traces needs at least one item")
    rng = rng if rng is not None else np.random.default_rng()
    sizes = {tuple(it["rgb"].shape) for it in items}
    if len(sizes) > 1:
        raise ValueError(f"items have different image shapes {sorted(sizes)}; resize them first")

    keep = []
    for it in items:
        idx = np.flatnonzero(np.asarray(it["point_mask"], dtype=bool))
        if max_points is not None and len(idx) > max_points:
            first = np.empty(0, dtype=idx.dtype)
            if moving_share > 0:
                moving = idx[moving_point_mask(it)[idx]]
                k = min(len(moving), int(round(moving_share * max_points)))
                first = rng.choice(moving, size=k, replace=False)
            rest = np.setdiff1d(idx, first) if len(first) else idx
            fill = rng.choice(rest, size=max_points - len(first), replace=False)
            idx = np.sort(np.concatenate([first, fill]))
        keep.append(idx)
    N = max(1, max(len(k) for k in keep))  # at least one (padded) slot keeps shapes non-empty

    def gather(key: str, fill: Any, dtype: Any) -> np.ndarray:
        first = np.asarray(items[0][key])
        out = np.full((len(items), N, *first.shape[1:]), fill, dtype=dtype)
        for b, (it, idx) in enumerate(zip(items, keep)):
            out[b, : len(idx)] = np.asarray(it[key])[idx]
        return out

    point_mask = np.zeros((len(items), N), dtype=bool)
    for b, idx in enumerate(keep):
        point_mask[b, : len(idx)] = True
    has_depth = all(it.get("depth_m") is not None for it in items)
    # The simulator's truth travels along only when every item has it (evaluation).
    has_truth = all("gt_future_valid" in it for it in items)
    return TraceBatch(
        hist_uvz=torch.from_numpy(gather("hist_uvz", 0.0, np.float32)),
        hist_valid=torch.from_numpy(gather("hist_valid", False, bool)),
        future_uvz=torch.from_numpy(gather("future_uvz", 0.0, np.float32)),
        future_valid=torch.from_numpy(gather("future_valid", False, bool)),
        point_mask=torch.from_numpy(point_mask),
        intrinsics=torch.from_numpy(
            np.stack([it["intrinsics"] for it in items]).astype(np.float32)
        ),
        image_size=torch.from_numpy(np.stack([it["image_size"] for it in items]).astype(np.int64)),
        instructions=[it["instruction"] for it in items],
        rgb=torch.from_numpy(np.stack([it["rgb"] for it in items])),
        depth_m=(
            torch.from_numpy(np.stack([it["depth_m"] for it in items]).astype(np.float32))
            if has_depth
            else None
        ),
        group_id=torch.from_numpy(gather("group_id", -1, np.int64)),
        gt_future_uvz=(
            torch.from_numpy(gather("gt_future_uvz", 0.0, np.float32)) if has_truth else None
        ),
        gt_future_valid=(
            torch.from_numpy(gather("gt_future_valid", False, bool)) if has_truth else None
        ),
        gt_part=(
            torch.from_numpy(gather("gt_part", 0, np.int64))
            if all("gt_part" in it for it in items)
            else None
        ),
    )
