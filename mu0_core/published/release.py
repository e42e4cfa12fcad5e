"""Load a published μ0 release strictly, and run it on camera inputs.

A release directory holds ``final_ckpt/config.json`` (the LeRobot policy config, ``"type":
"smolvla"``), ``final_ckpt/model.safetensors`` and ``normalizer_stats.json`` (also accepted:
the ``final_ckpt`` directory itself with the stats beside or above it). The release names its
VLM and DINOv2 by hub id; nothing is downloaded: their configs and the VLM's tokenizer come
from local directories the user names.

Every tensor of ``model.safetensors`` is either loaded into the port (under a renamed key,
``KEY_MAP``) or ignored on purpose (``IGNORED``, with the reason); anything else, anything
missing, a wrong shape or a non-float dtype raises ``ReleaseError`` naming the key and what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mu0_core.published import preprocess
from mu0_core.published.config import PublishedConfig
from mu0_core.published.model import PublishedMu0


class ReleaseError(ValueError):
    """A release directory that does not match what the port expects; the message says what to fix."""


# Reference key (after the leading "model.") -> port key. First match wins.
KEY_MAP: list[tuple[str, str]] = [
    (r"^vlm_with_expert\.vlm\.model\.vision_model\.(?:base_model\.model\.)?", "vision."),
    (r"^vlm_with_expert\._depth_patch_embedding\.", "vision.embeddings.patch_embedding.depth."),
    (r"^vlm_with_expert\.vlm\.model\.connector\.", "connector."),
    (r"^vlm_with_expert\.vlm\.model\.text_model\.embed_tokens\.", "embed_tokens."),
    (r"^vlm_with_expert\.vlm\.model\.text_model\.layers\.", "vlm_layers."),
    (r"^vlm_with_expert\.lm_expert\.layers\.", "expert_layers."),
    (r"^vlm_with_expert\.lm_expert\.norm\.", "expert_norm."),
    (r"^trace_timestep_embedder\.mlp\.", "trace_timestep_embedder."),
    (r"^(dino|trace_)", r"\1"),
]
# Inside the vision tower: PEFT's adapter names and the stem the depth pass swaps.
_VISION_FIXES = [
    (r"\.lora_([AB])\.default\.", r".lora_\1."),
    (
        r"^vision\.embeddings\.patch_embedding\.(weight|bias)$",
        r"vision.embeddings.patch_embedding.rgb.\1",
    ),
]
# transformers renamed DINOv2's attention weights after 5.3 (the release's naming); applied
# only when the installed version's model has the new names.
_DINO_FIXES = [
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
]

# Reference keys the port does not use, and why (patterns after the leading "model.").
IGNORED: list[tuple[str, str]] = [
    (r"^vlm_with_expert\.vlm\.lm_head\.", "the VLM's LM head: μ0 never decodes text"),
    (
        r"^vlm_with_expert\.vlm\.model\.text_model\.norm\.",
        "the VLM's final norm: the expert reads only the VLM layers' keys/values",
    ),
    (
        r"^vlm_with_expert\.lm_expert\.(embed_tokens|lm_head)\.",
        "the expert's token embedding/head: it reads trace tokens",
    ),
    (
        r"^(action_time_mlp_in|action_time_mlp_out|action_in_proj|action_out_proj|state_proj)\.",
        "SmolVLA's action-mode layers, built but unused in trace mode",
    ),
]

_FLOAT = {"F32", "BF16", "F16", "F64"}  # safetensors dtype names


def _port_key(ref_key: str, expected: dict) -> str | None:
    if not ref_key.startswith("model."):
        return None
    k = ref_key[len("model.") :]
    for pattern, repl in KEY_MAP:
        if re.match(pattern, k):
            out = re.sub(pattern, repl, k, count=1)
            fixes = {"vision.": _VISION_FIXES, "dino.": _DINO_FIXES}
            for prefix, subs in fixes.items():
                if out.startswith(prefix) and out not in expected:
                    for p, r in subs:
                        out = re.sub(p, r, out)
            return out
    return None


def _ignored_reason(ref_key: str) -> str | None:
    k = ref_key[len("model.") :] if ref_key.startswith("model.") else ref_key
    for pattern, reason in IGNORED:
        if re.match(pattern, k):
            return reason
    return None


def is_release_dir(path: str | Path) -> bool:
    """True for a published-μ0 release (LeRobot ``final_ckpt/``), not one of our checkpoints."""
    path = Path(path)
    for cfg in (path / "final_ckpt" / "config.json", path / "config.json"):
        if cfg.is_file():
            try:
                return json.loads(cfg.read_text()).get("type") == "smolvla"
            except (json.JSONDecodeError, AttributeError):
                return False
    return False


def _find_files(release_dir: Path) -> tuple[Path, Path, Path]:
    release_dir = Path(release_dir)
    if not release_dir.is_dir():
        raise ReleaseError(f"release directory {release_dir} does not exist")
    ckpt = release_dir / "final_ckpt" if (release_dir / "final_ckpt").is_dir() else release_dir
    for name in ("config.json", "model.safetensors"):
        if not (ckpt / name).is_file():
            raise ReleaseError(
                f"{ckpt / name} is missing: a release holds final_ckpt/config.json and "
                "final_ckpt/model.safetensors (see docs/published-mu0.md)"
            )
    for stats in (ckpt / "normalizer_stats.json", ckpt.parent / "normalizer_stats.json"):
        if stats.is_file():
            return ckpt / "config.json", ckpt / "model.safetensors", stats
    raise ReleaseError(
        f"normalizer_stats.json not found in {ckpt} or {ckpt.parent}: put the release's "
        "normalizer_stats.json next to final_ckpt/"
    )


def read_config(config_path: Path, stats: dict) -> PublishedConfig:
    raw = json.loads(Path(config_path).read_text())
    if raw.get("type") != "smolvla" or not raw.get("trace_mode", False):
        raise ReleaseError(
            f"{config_path}: not a μ0 trace release (want type 'smolvla' with trace_mode true, "
            f"got type {raw.get('type')!r}, trace_mode {raw.get('trace_mode')!r})"
        )
    size = raw.get("resize_imgs_with_padding")
    if not size or size[0] != size[1]:
        raise ReleaseError(f"{config_path}: resize_imgs_with_padding must be square, got {size}")
    # LeRobot writes every field; a missing one would silently take our default, not the
    # reference's, so refuse it.
    needed = {f.name for f in dataclasses.fields(PublishedConfig)} - {"image_size", "delta_scale"}
    missing = sorted(needed - raw.keys())
    if missing:
        raise ReleaseError(
            f"{config_path} lacks {missing}: use the config.json shipped with the release"
        )
    values = {k: raw[k] for k in needed}
    for k in ("depth_lora_targets",):
        if k in values:
            values[k] = tuple(values[k])
    values["image_size"] = int(size[0])
    values["delta_scale"] = tuple(float(stats[f"delta_scale_{a}"]) for a in "xyz")
    return PublishedConfig(**values)


def read_stats(stats_path: Path, use_depth: bool) -> dict:
    stats = json.loads(Path(stats_path).read_text())
    missing = [f"delta_scale_{a}" for a in "xyz" if f"delta_scale_{a}" not in stats]
    if missing:
        raise ReleaseError(
            f"{stats_path} lacks {missing}: the release's normalizer_stats.json carries the "
            "trace scale; use the file shipped with the checkpoint"
        )
    if use_depth and not {"depth_log_min", "depth_log_max"} <= stats.keys():
        raise ReleaseError(
            f"{stats_path} has no depth range (depth_log_min / depth_log_max): the release "
            "renders depth on that log range; use the normalizer_stats.json shipped with the "
            "checkpoint (or add the training set's log(p1) / log(p99) depth in metres)"
        )
    if use_depth and not stats["depth_log_max"] > stats["depth_log_min"]:
        raise ReleaseError(f"{stats_path}: depth_log_max must exceed depth_log_min")
    return stats


def _load_tokenizer(vlm_dir: Path):
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json")
    if not vlm_dir.is_dir() or not any((vlm_dir / n).is_file() for n in names):
        raise ReleaseError(
            f"no tokenizer in --vlm-dir {vlm_dir}: copy tokenizer.json and "
            "tokenizer_config.json of SmolVLM2-2.2B-Instruct there (docs/published-mu0.md)"
        )
    return AutoTokenizer.from_pretrained(str(vlm_dir), local_files_only=True)


def _load_config(directory: Path, what: str, flag: str):
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise ReleaseError(
            f"{flag} {directory} has no config.json: put the {what} config there "
            "(docs/published-mu0.md)"
        )
    return AutoConfig.from_pretrained(str(directory), local_files_only=True)


@dataclass
class PublishedRelease:
    """A loaded release: the frozen model plus what its preprocessing needs."""

    model: PublishedMu0
    tokenizer: object
    depth_log_range: tuple[float, float] | None
    content_hash: str
    used_keys: list[str] = field(default_factory=list)
    ignored_keys: dict[str, str] = field(default_factory=dict)
    image_tokens: tuple[list[int], list[int]] | None = None

    @property
    def cfg(self) -> PublishedConfig:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.basis.device

    def preprocess(
        self, rgb, depth_m: np.ndarray | None, instructions: list[str]
    ) -> dict[str, Tensor]:
        """Camera inputs (batched) -> the model's image and language tensors."""
        S, dev = self.cfg.image_size, self.device
        rgb_t = preprocess.resize_images(preprocess.rgb_to_tensor(rgb), S)
        depth_t = None
        if depth_m is not None and self.cfg.use_depth:
            depth_t = preprocess.depth_to_tensor(depth_m, self.depth_log_range, S)
        tokens, mask = preprocess.tokenize(
            self.tokenizer, instructions, self.cfg.tokenizer_max_length
        )
        out = {"rgb": rgb_t.to(dev), "lang_tokens": tokens.to(dev), "lang_mask": mask.to(dev)}
        out["depth_rgb"] = depth_t.to(dev) if depth_t is not None else None
        return out

    def sample(
        self,
        rgb,
        depth_m: np.ndarray | None,
        instructions: list[str],
        current_kp: Tensor,
        traj_history: Tensor,
        point_mask: Tensor,
        noise: Tensor | None = None,
        seed: int = 0,
        history_mask: Tensor | None = None,
        depth_mask: Tensor | None = None,
        **kwargs,
    ) -> dict[str, Tensor]:
        """Preprocess then sample, all in the reference's keypoint conventions (see
        ``PublishedMu0.sample``). Noise is explicit, or drawn from N(0, 1) seeded by ``seed``."""
        inputs = self.preprocess(rgb, depth_m, instructions)
        B, N = point_mask.shape
        if noise is None:
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(B, N, self.cfg.trace_bspline_n_ctrl, 3, generator=g)
        dev = self.device
        return self.model.sample(
            inputs["rgb"],
            inputs["depth_rgb"],
            depth_mask.to(dev) if depth_mask is not None else None,
            inputs["lang_tokens"],
            inputs["lang_mask"],
            current_kp.to(dev),
            traj_history.to(dev),
            point_mask.to(dev),
            noise.to(dev),
            history_mask=history_mask.to(dev) if history_mask is not None else None,
            image_tokens=self.image_tokens,
            **kwargs,
        )


def load_release(
    release_dir: str | Path,
    vlm_dir: str | Path,
    dino_dir: str | Path | None = None,
    device: str = "cpu",
) -> PublishedRelease:
    """Build the port from local configs and load the release's weights strictly (frozen, eval)."""
    from safetensors import safe_open

    config_path, weights_path, stats_path = _find_files(Path(release_dir))
    raw_cfg = json.loads(config_path.read_text())
    stats = read_stats(stats_path, bool(raw_cfg.get("use_depth", False)))
    cfg = read_config(config_path, stats)
    vlm_dir = Path(vlm_dir)
    tokenizer = _load_tokenizer(vlm_dir)
    vlm_config = _load_config(vlm_dir, "SmolVLM2-2.2B-Instruct", "--vlm-dir")
    dino_config = None
    if cfg.use_dino:
        if dino_dir is None:
            raise ReleaseError(
                "this release uses DINOv2 features: give --dino-dir (dinov2-base config)"
            )
        dino_config = _load_config(Path(dino_dir), "dinov2-base", "--dino-dir")

    with torch.device("meta"):
        model = PublishedMu0(cfg, vlm_config, dino_config)
    expected = model.state_dict()
    with safe_open(str(weights_path), framework="pt") as f:
        # First every key, shape and dtype (headers only), so a bad file fails before any
        # memory is spent; then the tensors, one at a time, straight into the model.
        plan, ignored = _check_keys(f, expected, weights_path.name)
        model = model.to_empty(device=device)
        params = model.state_dict()
        digest = hashlib.sha256()
        with torch.no_grad():
            for ref_key, key in plan:
                tensor = f.get_tensor(ref_key)
                digest.update(ref_key.encode())
                digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
                params[key].copy_(tensor)
    reset_buffers(model)  # the non-persistent ones were built on the meta device
    model = model.to(device).eval().requires_grad_(False)

    image_tokens = None
    if cfg.add_image_special_tokens:
        ids = tokenizer.convert_tokens_to_ids(["<fake_token_around_image>", "<global-img>"])
        image_tokens = ([ids[0], ids[1]], [ids[0]])
    depth_range = (
        (float(stats["depth_log_min"]), float(stats["depth_log_max"])) if cfg.use_depth else None
    )
    return PublishedRelease(
        model=model,
        tokenizer=tokenizer,
        depth_log_range=depth_range,
        content_hash=digest.hexdigest()[:16],
        used_keys=sorted(key for _, key in plan),
        ignored_keys=ignored,
        image_tokens=image_tokens,
    )


def _check_keys(f, expected: dict, file_name: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Match every tensor of the file to a port key or an ignore rule, checking shapes and
    dtypes; returns ([(release key, port key)], {ignored release key: reason})."""
    plan: list[tuple[str, str]] = []
    ignored: dict[str, str] = {}
    for ref_key in sorted(f.keys()):
        reason = _ignored_reason(ref_key)
        if reason is not None:
            ignored[ref_key] = reason
            continue
        key = _port_key(ref_key, expected)
        if key is None or key not in expected:
            raise ReleaseError(
                f"{file_name}: unexpected key {ref_key!r} (the port has no place for it). Is this "
                "a μ0 trace release with the config.json beside it?"
            )
        sl = f.get_slice(ref_key)
        shape, want = list(sl.get_shape()), list(expected[key].shape)
        if shape != want:
            raise ReleaseError(
                f"{file_name}: {ref_key!r} has shape {shape}, the port expects {want} from "
                "config.json and the configs in --vlm-dir/--dino-dir; give the VLM/DINOv2 configs "
                "the release was trained with (SmolVLM2-2.2B-Instruct, dinov2-base) and the "
                "release's own config.json"
            )
        if sl.get_dtype() not in _FLOAT:
            raise ReleaseError(
                f"{file_name}: {ref_key!r} is {sl.get_dtype()}, expected a float tensor"
            )
        plan.append((ref_key, key))
    missing = sorted(set(expected) - {key for _, key in plan})
    if missing:
        raise ReleaseError(
            f"{file_name} lacks {len(missing)} tensor(s) the port needs, e.g. {missing[:3]} "
            "(port names); the release is incomplete or built with other flags than its "
            "config.json says"
        )
    return plan, ignored


def reset_buffers(model: PublishedMu0) -> None:
    from mu0_core.published.model import reference_basis

    cfg = model.cfg
    model.basis = reference_basis(cfg.trace_bspline_n_ctrl, cfg.future_len)
    model.dino_mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    model.dino_std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
