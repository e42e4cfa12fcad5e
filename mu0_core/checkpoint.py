"""Checkpoints: a directory with ``model.safetensors`` and ``config.json``. Nothing is pickled.

``config.json`` holds the model config, the normalisation statistics, the code version, the
sha256 of the weights file, and fingerprints of external weights that are not stored (the
packaged frozen encoders of ``tiny``). Loading needs nothing but the directory; it is strict:
a corrupted file, a different external encoder, or any missing, extra or mis-shaped key
raises with the key's path.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mu0_core import __version__
from mu0_core.config import Mu0Config

FORMAT = "mu0-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is (the message says what and where)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def code_version() -> dict[str, str | None]:
    commit = None
    try:
        repo = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0:
            commit = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"mu0": __version__, "git_commit": commit, "torch": torch.__version__}


def _stored_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    skip = tuple("backbone." + p for p in model.backbone.external_state_prefixes())
    return {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}


def save_checkpoint(model, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a Mu0) to ``directory``; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in _stored_state(model).items()}
    weights = directory / WEIGHTS_FILE
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT})
    tmp.replace(weights)  # a crash mid-write never leaves a half-written checkpoint behind
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.cfg.to_dict(),
        "normalization": model.normalization(),
        "external_weights": model.backbone.fingerprint(),
        "code_version": code_version(),
        "content_hash": _sha256(weights),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "extra": extra or {},
    }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_metadata(path: str | Path) -> dict[str, Any]:
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{directory}: not a μ0 checkpoint (expected {CONFIG_FILE} and {WEIGHTS_FILE} in it)"
        )
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path}: format_version {meta.get('format_version')} is not supported "
            f"(this code reads version {FORMAT_VERSION})"
        )
    meta["_directory"] = str(directory)
    return meta


def check_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError listing every missing, unexpected or mis-shaped key."""
    problems = []
    for k in sorted(set(expected) - set(found)):
        problems.append(f"missing key {k} (shape {list(expected[k].shape)})")
    for k in sorted(set(found) - set(expected)):
        problems.append(f"unexpected key {k} (shape {list(found[k].shape)})")
    for k in sorted(set(expected) & set(found)):
        e, f = expected[k], found[k]
        if e.shape != f.shape:
            problems.append(
                f"shape mismatch at {k}: checkpoint {list(f.shape)}, model {list(e.shape)}"
            )
        elif e.dtype != f.dtype:
            problems.append(f"dtype mismatch at {k}: checkpoint {f.dtype}, model {e.dtype}")
    if problems:
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """→ (Mu0 in eval mode with every parameter frozen, metadata dict)."""
    from mu0_core.model import Mu0

    meta = read_metadata(path)
    directory = Path(meta["_directory"])
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} is missing")
    digest = _sha256(weights)
    if digest != meta.get("content_hash"):
        raise CheckpointError(
            f"{weights}: content hash {digest} differs from config.json's {meta.get('content_hash')} "
            "(the file is corrupted or was replaced)"
        )
    cfg = Mu0Config.from_dict(meta["model"])
    model = Mu0(cfg)
    found_fp = model.backbone.fingerprint()
    expected_fp = meta.get("external_weights", {})
    diff = {k: (expected_fp.get(k), found_fp.get(k)) for k in set(expected_fp) | set(found_fp)}
    diff = {k: v for k, v in diff.items() if v[0] != v[1]}
    if diff:
        lines = [
            f"{k}: checkpoint expects {a!r}, installed {b!r}" for k, (a, b) in sorted(diff.items())
        ]
        raise CheckpointError(
            "external weights differ from the ones trained with:\n  " + "\n  ".join(lines)
        )
    state = load_file(str(weights))
    check_state(_stored_state(model), state)
    model.load_state_dict(state, strict=False)  # external encoders are already loaded
    model.set_normalization(meta["normalization"])
    model.to(device).eval().requires_grad_(False)
    return model, meta


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """The frozen model alone (for serving)."""
    return load_checkpoint(path, device)[0]
