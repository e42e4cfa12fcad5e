"""Episode readers for TraceExtract: LeRobot v3 datasets (ours or any with depth), frame folders.

Every reader yields ``RGBDEpisode``s and is described by a small JSON-able ``spec`` dict,
so a worker process (or a Ray task on another machine) reopens the source by itself and
only episode ids travel between processes.

LeRobot v3 layout (what ``envs.collect`` writes and what is read here)::

    meta/info.json                                  codebase_version "v3.0", fps, features, paths
    meta/tasks.parquet                              task string (pandas index) -> task_index
    meta/episodes/chunk-000/file-000.parquet        one row per episode: length, tasks, file indices
    meta/stats.json                                 per-feature min / max / mean / std / count
    data/chunk-000/file-XXX.parquet                 one row per frame

Our recordings store, per camera ``<cam>``: ``observation.images.<cam>`` (PNG image),
``observation.depth.<cam>`` (float32 [H, W], metres, lossless), ``observation.intrinsics.<cam>``
(float32 [4]: fx, fy, cx, cy), ``observation.T_world_cam.<cam>`` (float32 [4, 4], OpenCV
camera -> world); and the simulator's truth ``observation.sim.body_pose`` (float32 [B, 7]:
position, quaternion wxyz per body), ``observation.sim.segmentation.<cam>`` (int32 [H, W]
body id per pixel, -1 none) — truth used for evaluation only, never for extraction.
Generic datasets may store depth as a 16-bit PNG image (millimetres by default).

A frame folder: ``<root>/<episode>/rgb/*.png|jpg``, ``<root>/<episode>/depth/*.png``
(uint16, ``depth_scale`` metres per unit, default 0.001) or ``*.npy`` (float32 metres),
``intrinsics.json`` ({"fx", "fy", "cx", "cy"} and optionally "depth_scale") in the episode
folder or the root, optional ``T_world_cam.npy`` (float [F, 4, 4]) and ``instruction.txt``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mu0_core.extract import ExtractError, import_cv2

CODEBASE_VERSION = "v3.0"
INFO_PATH = "meta/info.json"
TASKS_PATH = "meta/tasks.parquet"
STATS_PATH = "meta/stats.json"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"

PYARROW_HINT = "reading and writing LeRobot v3 datasets needs pyarrow: pip install 'mu0[sim]'"


def rgb_key(camera: str) -> str:
    return f"observation.images.{camera}"


def depth_key(camera: str) -> str:
    return f"observation.depth.{camera}"


def intrinsics_key(camera: str) -> str:
    return f"observation.intrinsics.{camera}"


def pose_key(camera: str) -> str:
    return f"observation.T_world_cam.{camera}"


def segmentation_key(camera: str) -> str:
    return f"observation.sim.segmentation.{camera}"


BODY_POSE_KEY = "observation.sim.body_pose"
STATE_KEY = "observation.state"
ACTION_KEY = "action"


def import_pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise ImportError(f"{PYARROW_HINT} ({e})") from e
    return pa, pq


@dataclass
class SimTruth:
    """The simulator's ground truth for one episode (evaluation only)."""

    body_pose: np.ndarray  # float32[F, B, 7] world position + quaternion wxyz per body
    body_names: list[str]
    segmentation: np.ndarray | None = None  # int32[F, H, W] body id per pixel, -1 none


@dataclass
class RGBDEpisode:
    """One RGB-D episode of F frames from one camera, with what the pipeline needs."""

    id: str
    rgb: np.ndarray  # uint8[F, H, W, 3]
    depth_m: np.ndarray  # float32[F, H, W], 0 = unknown
    intrinsics: np.ndarray  # float32[F, 4] fx, fy, cx, cy (pixels)
    T_world_cam: np.ndarray  # float32[F, 4, 4] camera (OpenCV) -> world
    instruction: str = ""
    task: str = ""
    robot: str | None = None
    fps: float = 20.0
    gripper_closed: np.ndarray | None = None  # float32[F] in [0, 1], 1 = closed (commanded)
    up_world: np.ndarray | None = None  # float[3]: "up" in the world frame, if known
    sim: SimTruth | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.rgb.shape[0])

    def validate(self) -> None:
        """Raise ExtractError (naming this episode) on input the pipeline cannot use."""
        rgb, depth = self.rgb, self.depth_m
        if rgb is None or rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise ExtractError(self.id, f"rgb must be uint8[F, H, W, 3], got {_shape(rgb)}")
        F, H, W, _ = rgb.shape
        if F < 2:
            raise ExtractError(self.id, f"needs at least 2 frames, got {F} (empty episode?)")
        if depth is None:
            raise ExtractError(self.id, "no depth: TraceExtract needs RGB-D")
        if depth.shape != (F, H, W):
            raise ExtractError(
                self.id, f"depth {_shape(depth)} does not match rgb frames and size {(F, H, W)}"
            )
        if self.intrinsics.shape != (F, 4):
            raise ExtractError(self.id, f"intrinsics must be [F, 4], got {_shape(self.intrinsics)}")
        if self.T_world_cam.shape != (F, 4, 4):
            raise ExtractError(
                self.id, f"T_world_cam must be [F, 4, 4], got {_shape(self.T_world_cam)}"
            )
        valid = np.isfinite(depth) & (depth > 0)
        if valid.mean() < 0.05:
            raise ExtractError(self.id, "depth is missing almost everywhere (< 5% valid pixels)")
        if not np.isfinite(self.intrinsics).all() or (self.intrinsics[:, :2] <= 0).any():
            raise ExtractError(self.id, "intrinsics must be finite with positive focal lengths")


def _shape(x: Any) -> Any:
    return None if x is None else tuple(np.shape(x))


# ---------------------------------------------------------------------------
# Arrow columns <-> numpy


def column_to_numpy(column: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A (nested) list / fixed-size-list arrow column -> numpy [rows, *shape]."""
    pa, _ = import_pyarrow()
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    while pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, *shape)


def decode_images(column: Any, flags: str = "color") -> np.ndarray:
    """An image column (struct {bytes, path}) -> uint8[F, H, W, 3] RGB or [F, H, W] (unchanged)."""
    cv2 = import_cv2()
    out = []
    for cell in column.to_pylist():
        data = cell["bytes"] if isinstance(cell, dict) else cell
        if data is None:
            raise ValueError("image cell without bytes (images stored as external paths?)")
        buf = np.frombuffer(data, dtype=np.uint8)
        if flags == "color":
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
            out.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
        else:
            out.append(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED))
    return np.stack(out)


# ---------------------------------------------------------------------------
# LeRobot v3


class LeRobotV3Source:
    """Episodes of a LeRobot v3 dataset directory with depth.

    camera: which camera (default: the first ``observation.images.*`` feature that has a
    depth feature beside it). For datasets that do not record intrinsics or camera poses
    per frame, pass ``intrinsics`` (fx, fy, cx, cy); the camera is then taken as fixed,
    and its frame is the world frame unless ``T_world_cam`` (4x4) is given.
    """

    kind = "lerobot"

    def __init__(
        self,
        root: str | Path,
        camera: str | None = None,
        intrinsics: tuple[float, float, float, float] | None = None,
        T_world_cam: Any = None,
        depth_scale: float = 0.001,
    ):
        self.root = Path(root)
        info_path = self.root / INFO_PATH
        if not info_path.exists():
            raise FileNotFoundError(f"{info_path} not found: not a LeRobot v3 dataset")
        self.info = json.loads(info_path.read_text())
        version = str(self.info.get("codebase_version", ""))
        if not version.startswith("v3"):
            raise ValueError(f"{self.root}: codebase_version {version!r}, expected v3.x")
        self.features: dict[str, dict] = self.info["features"]
        self.rgb_key, self.depth_key = self._pick_camera(camera)
        self.camera = self.rgb_key.rsplit(".", 1)[-1]
        self.intrinsics = None if intrinsics is None else tuple(float(x) for x in intrinsics)
        self.T_world_cam = None if T_world_cam is None else np.asarray(T_world_cam, np.float64)
        self.depth_scale = float(depth_scale)
        _, pq = import_pyarrow()
        self._episodes = _read_episodes_meta(self.root)
        self._tasks = _read_tasks(self.root)

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "root": str(self.root),
            "camera": self.camera,
            "intrinsics": self.intrinsics,
            "T_world_cam": None if self.T_world_cam is None else self.T_world_cam.tolist(),
            "depth_scale": self.depth_scale,
        }

    def _pick_camera(self, camera: str | None) -> tuple[str, str]:
        images = [k for k, f in self.features.items() if f["dtype"] in ("image", "video")]
        images = [k for k in images if "depth" not in k]
        depths = [k for k in self.features if "depth" in k]
        if camera is not None:
            images = [k for k in images if k.rsplit(".", 1)[-1] == camera]
        for key in images:
            cam = key.rsplit(".", 1)[-1]
            match = [d for d in depths if d.rsplit(".", 1)[-1] == cam] or (
                depths if len(images) == 1 else []
            )
            if match:
                return key, match[0]
        raise ValueError(
            f"{self.root}: no camera with both an image and a depth feature "
            f"(images {images}, depth features {depths}); TraceExtract needs RGB-D"
        )

    def episode_ids(self) -> list[str]:
        return [self._id(int(i)) for i in sorted(self._episodes)]

    def _id(self, index: int) -> str:
        return f"episode_{index:06d}"

    def load(self, episode_id: str) -> RGBDEpisode:
        _, pq = import_pyarrow()
        try:
            index = int(episode_id.rsplit("_", 1)[-1])
            row = self._episodes[index]
        except (ValueError, KeyError):
            raise ExtractError(episode_id, f"not in {self.root}") from None
        path = self.root / self.info["data_path"].format(
            chunk_index=int(row["data/chunk_index"]), file_index=int(row["data/file_index"])
        )
        table = pq.read_table(path, filters=[("episode_index", "=", index)])
        table = table.sort_by("frame_index")
        F = table.num_rows
        if F == 0:
            raise ExtractError(episode_id, "no frames (empty episode)")
        cols = set(table.column_names)

        if self.features[self.rgb_key]["dtype"] == "video":
            rgb = self._read_video(row, F)
        else:
            rgb = decode_images(table.column(self.rgb_key))
        H, W = rgb.shape[1:3]
        depth_ft = self.features[self.depth_key]
        if self.depth_key not in cols:
            raise ExtractError(episode_id, f"no depth column {self.depth_key!r}")
        if depth_ft["dtype"] == "image":
            raw = decode_images(table.column(self.depth_key), flags="unchanged")
            if raw.dtype != np.uint16:
                raise ExtractError(
                    episode_id, f"depth image {self.depth_key} is {raw.dtype}, expected 16-bit PNG"
                )
            depth = raw.astype(np.float32) * self.depth_scale
        elif depth_ft["dtype"] == "video":
            raise ExtractError(episode_id, "depth stored as video (lossy) is not supported")
        else:
            depth = column_to_numpy(
                table.column(self.depth_key), tuple(depth_ft["shape"]), np.float32
            )
        depth = np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)

        k_key, p_key = intrinsics_key(self.camera), pose_key(self.camera)
        if self.intrinsics is not None:
            K = np.tile(np.asarray(self.intrinsics, np.float32), (F, 1))
        elif k_key in cols:
            K = column_to_numpy(table.column(k_key), (4,), np.float32)
        else:
            raise ExtractError(
                episode_id,
                f"no intrinsics feature {k_key!r}: pass the camera's intrinsics (--intrinsics fx,fy,cx,cy)",
            )
        if self.T_world_cam is not None:
            T = np.tile(self.T_world_cam.astype(np.float32), (F, 1, 1))
        elif p_key in cols:
            T = column_to_numpy(table.column(p_key), (4, 4), np.float32)
        else:
            T = np.tile(np.eye(4, dtype=np.float32), (F, 1, 1))  # fixed camera = world frame

        task_index = int(table.column("task_index")[0].as_py()) if "task_index" in cols else 0
        instruction = self._tasks.get(task_index, "")
        extra = row.get("extra") or {}
        gripper = None
        if ACTION_KEY in cols and extra.get("gripper_action_index") is not None:
            actions = column_to_numpy(
                table.column(ACTION_KEY), tuple(self.features[ACTION_KEY]["shape"]), np.float32
            )
            # Our recorder's convention: the gripper command is -1 open, +1 closed.
            gripper = (actions[:, int(extra["gripper_action_index"])] > 0).astype(np.float32)
        sim = None
        if BODY_POSE_KEY in cols:
            names = self.features[BODY_POSE_KEY].get("names") or {}
            body_names = names.get("bodies", []) if isinstance(names, dict) else []
            shape = tuple(self.features[BODY_POSE_KEY]["shape"])
            seg_key = segmentation_key(self.camera)
            seg = (
                column_to_numpy(table.column(seg_key), (H, W), np.int32)
                if seg_key in cols
                else None
            )
            sim = SimTruth(
                body_pose=column_to_numpy(table.column(BODY_POSE_KEY), shape, np.float32),
                body_names=list(body_names),
                segmentation=seg,
            )
        up = extra.get("up_world")
        return RGBDEpisode(
            id=episode_id,
            rgb=rgb,
            depth_m=depth,
            intrinsics=K,
            T_world_cam=T,
            instruction=instruction,
            task=str(extra.get("task") or instruction),
            robot=extra.get("robot") or self.info.get("robot_type"),
            fps=float(self.info.get("fps", 20)),
            gripper_closed=gripper,
            up_world=None if up is None else np.asarray(up, np.float64),
            sim=sim,
        )

    def _read_video(self, row: dict, F: int) -> np.ndarray:
        cv2 = import_cv2()
        key = self.rgb_key
        rel = self.info["video_path"].format(
            video_key=key,
            chunk_index=int(row[f"videos/{key}/chunk_index"]),
            file_index=int(row[f"videos/{key}/file_index"]),
        )
        cap = cv2.VideoCapture(str(self.root / rel))
        start = float(row.get(f"videos/{key}/from_timestamp", 0.0))
        cap.set(cv2.CAP_PROP_POS_MSEC, start * 1000.0)
        frames = []
        while len(frames) < F:
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        cap.release()
        if len(frames) != F:
            raise ValueError(f"video {rel}: decoded {len(frames)} frames, expected {F}")
        return np.stack(frames)


def _read_episodes_meta(root: Path) -> dict[int, dict[str, Any]]:
    _, pq = import_pyarrow()
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root}/meta/episodes has no parquet files")
    rows: dict[int, dict[str, Any]] = {}
    for path in files:
        for r in pq.read_table(path).to_pylist():
            if "extra" in r and isinstance(r["extra"], str):
                r["extra"] = json.loads(r["extra"])
            rows[int(r["episode_index"])] = r
    return rows


def _read_tasks(root: Path) -> dict[int, str]:
    _, pq = import_pyarrow()
    path = root / TASKS_PATH
    if not path.exists():
        return {}
    table = pq.read_table(path)
    # pandas writes the task strings as the index column; some writers name it "task".
    name = "task" if "task" in table.column_names else "__index_level_0__"
    if name not in table.column_names:
        return {}
    return dict(zip(table.column("task_index").to_pylist(), table.column(name).to_pylist()))


# ---------------------------------------------------------------------------
# Frame folders


class FolderSource:
    """Episodes stored as folders of RGB and depth frames (see the module docstring)."""

    kind = "folder"

    def __init__(self, root: str | Path, instruction: str = ""):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a directory")
        self.instruction = instruction

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": str(self.root), "instruction": self.instruction}

    def episode_ids(self) -> list[str]:
        if (self.root / "rgb").is_dir():
            return [self.root.name]
        return sorted(p.name for p in self.root.iterdir() if (p / "rgb").is_dir())

    def _dir(self, episode_id: str) -> Path:
        return self.root if (self.root / "rgb").is_dir() else self.root / episode_id

    def load(self, episode_id: str) -> RGBDEpisode:
        cv2 = import_cv2()
        d = self._dir(episode_id)
        rgb_files = sorted(
            p for p in (d / "rgb").glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")
        )
        if not rgb_files:
            raise ExtractError(episode_id, f"no RGB frames in {d / 'rgb'} (empty episode)")
        k_path = next(
            (p for p in (d / "intrinsics.json", self.root / "intrinsics.json") if p.exists()), None
        )
        if k_path is None:
            raise ExtractError(episode_id, f"no intrinsics.json in {d} or {self.root}")
        k = json.loads(k_path.read_text())
        scale = float(k.get("depth_scale", 0.001))
        depth_dir = d / "depth"
        depth_files = sorted(depth_dir.glob("*.png")) + sorted(depth_dir.glob("*.npy"))
        if not depth_files:
            raise ExtractError(episode_id, f"no depth frames in {depth_dir}")
        if len(depth_files) != len(rgb_files):
            raise ExtractError(
                episode_id, f"{len(rgb_files)} RGB frames but {len(depth_files)} depth frames"
            )
        rgb = []
        for p in rgb_files:
            bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
            rgb.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        depth = []
        for p in depth_files:
            if p.suffix == ".npy":
                depth.append(np.load(p, allow_pickle=False).astype(np.float32))
            else:
                raw = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
                depth.append(raw.astype(np.float32) * scale)
        shapes = {a.shape[:2] for a in rgb} | {a.shape[:2] for a in depth}
        if len(shapes) != 1:
            raise ExtractError(episode_id, f"frames have different sizes {sorted(shapes)}")
        F = len(rgb)
        K = np.tile(np.array([k["fx"], k["fy"], k["cx"], k["cy"]], np.float32), (F, 1))
        pose_path = d / "T_world_cam.npy"
        if pose_path.exists():
            T = np.load(pose_path, allow_pickle=False).astype(np.float32)
            if T.shape == (4, 4):
                T = np.tile(T, (F, 1, 1))
        else:
            T = np.tile(np.eye(4, dtype=np.float32), (F, 1, 1))
        text = d / "instruction.txt"
        instruction = text.read_text().strip() if text.exists() else self.instruction
        depth_m = np.stack(depth)
        return RGBDEpisode(
            id=episode_id,
            rgb=np.stack(rgb),
            depth_m=np.where(np.isfinite(depth_m), depth_m, 0.0).astype(np.float32),
            intrinsics=K,
            T_world_cam=T,
            instruction=instruction,
            task=instruction,
        )


def open_source(spec: dict[str, Any] | str | Path, **kwargs: Any) -> LeRobotV3Source | FolderSource:
    """A source from its spec dict, or from a path (LeRobot v3 if it has meta/info.json)."""
    if isinstance(spec, dict):
        spec = dict(spec)
        kind = spec.pop("kind")
        if kind == "lerobot":
            return LeRobotV3Source(**spec)
        if kind == "folder":
            return FolderSource(**spec)
        raise ValueError(f"unknown source kind {kind!r}")
    root = Path(spec)
    if (root / INFO_PATH).exists():
        return LeRobotV3Source(root, **kwargs)
    return FolderSource(root, **{k: v for k, v in kwargs.items() if k == "instruction"})
