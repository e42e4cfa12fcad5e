"""Real simulated frames that ship with the package, for `mu0 predict` and the docs.

Each example is ``<name>.safetensors`` (one RGB-D frame, its query points with their real
8-step history, and the simulator's true future of each) plus ``<name>.json`` (the
instruction and where the frame came from). ``scripts/make_example_frame.py`` cuts one from
a trace dataset that `mu0 extract` wrote from a simulated episode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mu0_core.types import TraceQuery

HERE = Path(__file__).parent
DEFAULT = "stack_ur5e"

ARRAYS = {
    "rgb": np.uint8,  # [H, W, 3]
    "depth_m": np.float32,  # [H, W]
    "intrinsics": np.float32,  # [4] fx, fy, cx, cy
    "hist_uvz": np.float32,  # [N, 8, 3]
    "hist_valid": np.bool_,  # [N, 8]
    "gt_future_uvz": np.float32,  # [N, 32, 3] the simulator's truth
    "gt_future_valid": np.bool_,  # [N, 32]
}


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.safetensors"))


def load_example(name: str = DEFAULT) -> tuple[TraceQuery, dict[str, Any]]:
    """→ (the query, {"gt_future_uvz", "gt_future_valid", and the JSON's fields})."""
    from safetensors.numpy import load_file

    path = HERE / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no example frame {name!r}; shipped: {names()}")
    arrays = load_file(str(path))
    info = json.loads(path.with_suffix(".json").read_text())
    query = TraceQuery(
        rgb=arrays["rgb"],
        instruction=info["instruction"],
        hist_uvz=arrays["hist_uvz"],
        intrinsics=tuple(float(x) for x in arrays["intrinsics"]),
        depth_m=arrays["depth_m"],
        hist_valid=arrays["hist_valid"],
    )
    extra = {**info, **{k: arrays[k] for k in ("gt_future_uvz", "gt_future_valid")}}
    return query, extra


def save_example(name: str, arrays: dict[str, np.ndarray], info: dict[str, Any], out_dir=HERE):
    """Write ``<name>.safetensors`` and ``<name>.json`` (arrays as in ``ARRAYS``)."""
    from safetensors.numpy import save_file

    missing = sorted(ARRAYS.keys() - arrays.keys())
    if missing or "instruction" not in info:
        raise ValueError(f"example {name}: missing arrays {missing} or the instruction")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(arrays[k]).astype(t) for k, t in ARRAYS.items()},
        str(out_dir / f"{name}.safetensors"),
    )
    (out_dir / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
