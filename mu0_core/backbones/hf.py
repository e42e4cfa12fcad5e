"""The ``hf`` backbone: a transformers SmolVLM(2) vision-language model as μ0's prefix encoder.

As in the μ0 reference: the VLM's vision encoder (SigLIP) stays frozen, the text decoder is cut
to its first ``num_layers`` layers, and the prefix is [RGB image tokens, depth-colormap image
tokens, instruction tokens]. Images are not split into tiles the way SmolVLM's processor does it;
like SmolVLA / pi0 we resize each image to the encoder's square input and normalise it here, so
one image gives a fixed number of tokens and the patch grid stays aligned with the image.

Weights come from a local directory (nothing is downloaded). For benchmarks of large presets with
no weights on disk, the same architecture can be built with random weights from a config dict
(``smolvlm2_config`` gives the published SmolVLM2 sizes).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu0_core.backbones.base import Backbone, Prefix

_SUPPORTED_MODEL_TYPES = ("smolvlm",)
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def smolvlm2_config(name: str) -> dict[str, Any]:
    """Architecture of a published SmolVLM2 checkpoint, as a dict ``hf_config`` accepts.

    Written from the checkpoints' config.json facts (HuggingFaceTB/SmolVLM2-*-Instruct) so the
    large presets can be built with random weights offline; it carries no token ids beyond what
    the architecture needs.
    """
    presets: dict[str, dict[str, Any]] = {
        # SmolVLM2-256M-Video-Instruct: SmolLM2-135M-style decoder + SigLIP-B/16 at 512 px.
        "smolvlm2-256m": {
            "model_type": "smolvlm",
            "scale_factor": 4,  # 32x32 patches → 8x8 = 64 image tokens
            "image_token_id": 49190,
            "text_config": {
                "model_type": "llama",
                "hidden_size": 576,
                "intermediate_size": 1536,
                "num_hidden_layers": 30,
                "num_attention_heads": 9,
                "num_key_value_heads": 3,
                "vocab_size": 49280,
                "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5,
                "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
            },
            "vision_config": {
                "hidden_size": 768,
                "intermediate_size": 3072,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "patch_size": 16,
                "image_size": 512,
            },
        },
        # SmolVLM2-2.2B-Instruct: SmolLM2-1.7B decoder + SigLIP-so400m/14 at 384 px.
        "smolvlm2-2.2b": {
            "model_type": "smolvlm",
            "scale_factor": 3,  # 27x27 patches → 9x9 = 81 image tokens
            "image_token_id": 49190,
            "text_config": {
                "model_type": "llama",
                "hidden_size": 2048,
                "intermediate_size": 8192,
                "num_hidden_layers": 24,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "vocab_size": 49280,
                "max_position_embeddings": 16384,
                "rms_norm_eps": 1e-5,
                "rope_parameters": {"rope_type": "default", "rope_theta": 130000.0},
            },
            "vision_config": {
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_hidden_layers": 27,
                "num_attention_heads": 16,
                "patch_size": 14,
                "image_size": 384,
            },
        },
    }
    if name not in presets:
        raise KeyError(f"unknown SmolVLM2 architecture {name!r}; known: {sorted(presets)}")
    return json.loads(json.dumps(presets[name]))  # a deep copy callers may edit


class _ByteTokenizer:
    """Fallback tokenizer for random-weight builds (no tokenizer on disk): deterministic, no vocab
    file. UTF-8 byte ``b`` becomes id ``(b + 1) % vocab_size``, so the ids are stable across runs and
    machines; the text it gives the model is meaningless, which is fine for random weights."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [[(b + 1) % self.vocab_size for b in text.encode("utf-8")] for text in texts]


def _check_model_dir(model_dir: Path) -> None:
    """Fail early, naming what is missing, before transformers raises something vaguer."""
    needs = (
        "a transformers SmolVLM checkpoint: config.json, the weights (*.safetensors) and the "
        "tokenizer (tokenizer.json or tokenizer_config.json), e.g. a copy of "
        "HuggingFaceTB/SmolVLM2-2.2B-Instruct made with `hf download <repo> --local-dir DIR` on a "
        "machine with network access"
    )
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"hf backbone: model_dir {str(model_dir)!r} is not a directory; it must hold {needs}"
        )
    missing = []
    if not (model_dir / "config.json").is_file():
        missing.append("config.json")
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in model_dir.iterdir()):
        missing.append("weights (*.safetensors)")
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json or tokenizer_config.json)")
    if missing:
        raise FileNotFoundError(
            f"hf backbone: model_dir {str(model_dir)!r} lacks {', '.join(missing)}; it must hold {needs}"
        )


def _apply_overrides(config: Any, overrides: dict[str, Any]) -> None:
    """Set config attributes; a dict value for a sub-config (``text_config``) updates it in place."""
    from transformers import PretrainedConfig

    for key, value in overrides.items():
        current = getattr(config, key, None)
        if isinstance(value, dict) and isinstance(current, PretrainedConfig):
            _apply_overrides(current, value)
        else:
            setattr(config, key, value)


def _config_from_dict(hf_config: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    kwargs = dict(hf_config)
    model_type = kwargs.pop("model_type", "smolvlm")
    return AutoConfig.for_model(model_type, **kwargs)


def _read_image_stats(model_dir: Path | None, config: Any) -> tuple[list[float], list[float]]:
    """Pixel mean/std: the config's, else the image processor's, else SigLIP's 0.5/0.5."""
    for source in (config, getattr(config, "vision_config", None)):
        mean, std = getattr(source, "image_mean", None), getattr(source, "image_std", None)
        if mean is not None and std is not None:
            return list(mean), list(std)
    if model_dir is not None:
        for name in ("preprocessor_config.json", "processor_config.json"):
            path = model_dir / name
            if path.is_file():
                cfg = json.loads(path.read_text())
                cfg = cfg.get("image_processor", cfg)  # processor_config nests it
                if "image_mean" in cfg and "image_std" in cfg:
                    return list(cfg["image_mean"]), list(cfg["image_std"])
    return [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


class HFVLMBackbone(Backbone):
    """SmolVLM(2) prefix encoder: frozen vision tower, trainable connector + cut text decoder.

    Prefix layout (fixed length P = 2 * N_img + max_text_tokens):
    ``[RGB image tokens (N_img), depth image tokens (N_img), instruction tokens (T)]``.
    Depth tokens are always present and masked out (mask False) where a sample has no depth or
    its depth is dropped, so shapes never change with dropout. Position ids count only unmasked
    tokens, so an RGB-only prefix sees the same positions whether or not depth slots exist.

    Attention over the prefix is bidirectional (every token sees every unmasked token): the
    prefix is read, never generated, so causality buys nothing and the image tokens then see the
    instruction too (pi0 does the same over its prefix).

    ``freeze_vision=True`` (the reference): ``encode_frozen`` runs the vision tower without
    gradients and returns its hidden states, which training may cache. ``freeze_vision=False``:
    ``encode_frozen`` only resizes and normalises pixels and the vision tower runs (with
    gradients) in ``forward``.

    With ``model_dir=None`` the architecture is built from ``hf_config`` with random weights and
    instructions go through a byte-level fallback tokenizer (see ``_ByteTokenizer``).
    """

    def __init__(
        self,
        model_dir: str | Path | None,
        num_layers: int | None,
        freeze_vision: bool = True,
        torch_dtype: torch.dtype = torch.float32,
        config_overrides: dict[str, Any] | None = None,
        image_size: int | None = None,
        max_text_tokens: int = 32,
        hf_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir).expanduser().resolve() if model_dir is not None else None
        self._hf_config_dict = hf_config
        if self.model_dir is not None:
            _check_model_dir(self.model_dir)
            config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
        elif hf_config is not None:
            config = _config_from_dict(hf_config)
        else:
            raise ValueError(
                "hf backbone needs model_dir (a local checkpoint) or hf_config (random weights)"
            )
        if config.model_type not in _SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"hf backbone supports model types {_SUPPORTED_MODEL_TYPES}, got {config.model_type!r}"
            )
        _apply_overrides(config, config_overrides or {})

        # Cut the decoder in the config, before building: layers past num_layers are never
        # allocated, and their checkpoint weights are skipped while loading.
        total_layers = config.text_config.num_hidden_layers
        if num_layers is not None:
            if not 1 <= num_layers <= total_layers:
                raise ValueError(f"num_layers must be in [1, {total_layers}], got {num_layers}")
            config.text_config.num_hidden_layers = num_layers

        if self.model_dir is not None:
            self.vlm = self._load_pretrained(AutoModel, config, torch_dtype)
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        else:
            self.vlm = AutoModel.from_config(config, dtype=torch_dtype)
            self.tokenizer = _ByteTokenizer(config.text_config.vocab_size)

        vision_cfg, text_cfg = config.vision_config, config.text_config
        self.num_layers = text_cfg.num_hidden_layers
        self.freeze_vision = freeze_vision
        self.max_text_tokens = max_text_tokens
        self.patch_size = vision_cfg.patch_size
        self.scale_factor = config.scale_factor
        # SigLIP-so400m/14 at 384 px convolves to 27x27 patches: its effective input is the
        # largest multiple of the patch size (378 px), so that is what images are resized to.
        self.image_size = (
            image_size or (vision_cfg.image_size // vision_cfg.patch_size) * vision_cfg.patch_size
        )
        grid = self.image_size // self.patch_size  # patches per side
        if self.image_size % self.patch_size or grid % self.scale_factor:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size} with "
                f"patches per side divisible by the connector's scale_factor {self.scale_factor}"
            )
        self.patch_grid = grid
        self.num_image_tokens = (grid // self.scale_factor) ** 2
        self.prefix_dim = text_cfg.hidden_size
        self.point_feature_dim = vision_cfg.hidden_size

        mean, std = _read_image_stats(self.model_dir, config)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        if freeze_vision:
            self.vlm.vision_model.requires_grad_(False)
            self.vlm.vision_model.eval()
        # No lm_head: AutoModel builds SmolVLMModel, the VLM without its language-model head.

    def _load_pretrained(self, auto_model: Any, config: Any, torch_dtype: torch.dtype) -> nn.Module:
        from transformers.utils import logging as hf_logging

        # transformers logs the skipped layers of the cut as "UNEXPECTED" keys; that is by design
        # here, so we quiet its report and check the one thing that matters ourselves: no weight
        # of the kept model may be missing (it would silently stay random).
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity(logging.ERROR)
        try:
            model, info = auto_model.from_pretrained(
                self.model_dir,
                config=config,
                dtype=torch_dtype,
                local_files_only=True,
                output_loading_info=True,
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"hf backbone: {self.model_dir} lacks {len(missing)} weights of the model, e.g. {missing[:5]}"
            )
        return model

    # ----------------------------------------------------------------------------------- helpers

    @property
    def _device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def _dtype(self) -> torch.dtype:
        return self.vlm.connector.modality_projection.proj.weight.dtype

    def _pixels(self, images_01: Tensor) -> Tensor:
        """float[B, H, W, 3] in [0, 1] → float[B, 3, S, S] normalised vision-encoder input.

        A plain (aspect-changing) resize, no padding: normalised (u, v) in [-1, 1] then index the
        same place in the image and in the patch grid, which the feature maps rely on."""
        x = images_01.permute(0, 3, 1, 2).float()  # [B, 3, H, W]
        S = self.image_size
        x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
        x = (x.clamp(0.0, 1.0) - self.pixel_mean) / self.pixel_std  # [B, 3, S, S]
        return x.to(self._dtype)

    def _vision(self, pixels: Tensor) -> Tensor:
        """float[B, 3, S, S] → vision encoder last hidden state float[B, N_patch, C_vis]."""
        return self.vlm.vision_model(pixel_values=pixels).last_hidden_state

    def _tokenize(self, instructions: list[str]) -> tuple[Tensor, Tensor]:
        """Instruction → (int64[B, T] ids, bool[B, T] mask), padded/truncated to T = max_text_tokens.

        No special tokens; padding is our own (id 0, masked), so tokenizers without a pad token work."""
        if isinstance(self.tokenizer, _ByteTokenizer):
            ids_list = self.tokenizer(instructions)
        else:
            ids_list = self.tokenizer(instructions, add_special_tokens=False)["input_ids"]
        B, T = len(instructions), self.max_text_tokens
        ids = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for i, seq in enumerate(ids_list):
            seq = seq[:T]
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = True
        return ids.to(self._device), mask.to(self._device)

    # ------------------------------------------------------------------------------ the contract

    @torch.no_grad()
    def encode_frozen(
        self, rgb: Tensor, depth_m: Tensor | None, instructions: list[str]
    ) -> dict[str, Tensor]:
        """Frozen part: vision tower (when frozen) and tokenisation.

        Returns, batch-first (N = patches of one image, C = vision width, T = max_text_tokens):
        - ``rgb_vision``, ``depth_vision``: float[B, N, C] vision hidden states (frozen vision), or
          ``rgb_pixels``, ``depth_pixels``: float[B, 3, S, S] normalised pixels (trainable vision);
          the depth entry is zeros where ``has_depth`` is False;
        - ``has_depth``: bool[B], the sample has at least one valid depth pixel;
        - ``text_ids``: int64[B, T]; ``text_mask``: bool[B, T].
        """
        B, H, W, _ = rgb.shape
        if len(instructions) != B:
            raise ValueError(f"got {len(instructions)} instructions for a batch of {B} images")
        rgb = rgb.to(self._device)
        rgb_px = self._pixels(rgb.float() / 255.0)  # [B, 3, S, S]
        if depth_m is None:
            has_depth = torch.zeros(B, dtype=torch.bool, device=self._device)
            depth_px = torch.zeros_like(rgb_px)
        else:
            from mu0_core.backbones.depth import depth_to_colormap

            depth_m = depth_m.to(self._device)
            has_depth = (torch.isfinite(depth_m) & (depth_m > 0)).flatten(1).any(dim=1)  # [B]
            depth_px = self._pixels(depth_to_colormap(depth_m))  # [B, 3, S, S]
        text_ids, text_mask = self._tokenize(instructions)
        out = {"has_depth": has_depth, "text_ids": text_ids, "text_mask": text_mask}

        if not self.freeze_vision:
            return out | {"rgb_pixels": rgb_px, "depth_pixels": depth_px}
        if has_depth.any():
            hidden = self._vision(torch.cat([rgb_px, depth_px], dim=0))  # [2B, N, C], one pass
            rgb_hidden, depth_hidden = hidden[:B], hidden[B:]
            depth_hidden = depth_hidden * has_depth[:, None, None]  # no stale features where absent
        else:
            rgb_hidden = self._vision(rgb_px)  # [B, N, C]
            depth_hidden = torch.zeros_like(rgb_hidden)
        return out | {"rgb_vision": rgb_hidden, "depth_vision": depth_hidden}

    def forward(self, frozen: dict[str, Tensor], depth_keep: Tensor | None = None) -> Prefix:
        text_model = self.vlm.text_model
        if self.freeze_vision:
            rgb_hidden, depth_hidden = (
                frozen["rgb_vision"],
                frozen["depth_vision"],
            )  # [B, N, C] each
        else:
            B = frozen["rgb_pixels"].shape[0]
            hidden = self._vision(torch.cat([frozen["rgb_pixels"], frozen["depth_pixels"]], dim=0))
            rgb_hidden, depth_hidden = hidden[:B], hidden[B:]  # [B, N, C] each
        rgb_hidden, depth_hidden = rgb_hidden.to(self._dtype), depth_hidden.to(self._dtype)
        B, N, C = rgb_hidden.shape

        depth_on = frozen["has_depth"].bool()  # [B]
        if depth_keep is not None:
            depth_on = depth_on & depth_keep.to(depth_on.device).bool()
        text_mask = frozen["text_mask"].bool()  # [B, T]

        # Connector: pixel shuffle (N patches → N / scale² tokens) and projection to the text width.
        rgb_tok = self.vlm.connector(rgb_hidden)  # [B, N_img, D]
        depth_tok = self.vlm.connector(depth_hidden)  # [B, N_img, D]
        text_tok = text_model.embed_tokens(frozen["text_ids"])  # [B, T, D]
        x = torch.cat([rgb_tok, depth_tok, text_tok], dim=1)  # [B, P, D]
        N_img = rgb_tok.shape[1]
        img_mask = torch.ones(B, N_img, dtype=torch.bool, device=x.device)
        mask = torch.cat([img_mask, depth_on[:, None].expand(B, N_img), text_mask], dim=1)  # [B, P]

        # Positions count only attended tokens, so masked depth/padding leave no gaps.
        position_ids = (mask.long().cumsum(dim=1) - 1).clamp_min(0)  # [B, P]
        position_embeddings = text_model.rotary_emb(x, position_ids=position_ids)  # (cos, sin)
        attn_mask = self._bidirectional_mask(x, mask)
        for layer in text_model.layers:
            # is_causal=False: the decoder's attention defaults to causal wherever it gets no
            # materialised mask (SDPA with None, flash attention with a 2D or no mask).
            x = layer(
                x,
                attention_mask=attn_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                is_causal=False,
            )
        x = text_model.norm(x)  # [B, P, D]

        # Point features: the RGB patch grid in image layout (rows = v, columns = u).
        h = w = self.patch_grid
        feature_map = rgb_hidden.transpose(1, 2).reshape(B, C, h, w)  # [B, C_vis, h, w]
        return Prefix(tokens=x.float(), mask=mask, feature_maps=[feature_map.float()])

    def _bidirectional_mask(self, x: Tensor, mask: Tensor) -> Any:
        """bool[B, P] key mask → the mask format of the text model's attention implementation."""
        from transformers.masking_utils import create_bidirectional_mask

        # allow_is_bidirectional_skip=False: a skipped (None) mask would make SDPA run the
        # decoder's causal default instead of full attention.
        return create_bidirectional_mask(
            config=self.vlm.text_model.config,
            inputs_embeds=x,
            attention_mask=mask,
            allow_is_bidirectional_skip=False,
        )

    # ------------------------------------------------------------------------- freezing, identity

    def train(self, mode: bool = True) -> HFVLMBackbone:
        super().train(mode)
        if self.freeze_vision:
            self.vlm.vision_model.eval()  # frozen: its dropout/statistics never switch to training
        return self

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vision": self.vlm.vision_model} if self.freeze_vision else {}

    def external_state_prefixes(self) -> tuple[str, ...]:
        # Frozen weights from a local directory can be reloaded from it; random ones cannot.
        if self.model_dir is not None and self.freeze_vision:
            return ("vlm.vision_model.",)
        return ()

    def fingerprint(self) -> dict[str, str]:
        """Source name, sha256 of config.json, and a cheap sha256 of the weight files' names + sizes."""
        if self.model_dir is None:
            blob = json.dumps(self._hf_config_dict, sort_keys=True).encode()
            return {"source": "random-init", "config_sha256": hashlib.sha256(blob).hexdigest()}
        config_sha = hashlib.sha256((self.model_dir / "config.json").read_bytes()).hexdigest()
        weights = sorted(p for p in self.model_dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        listing = "\n".join(f"{p.name}:{p.stat().st_size}" for p in weights).encode()
        return {
            "source": self.model_dir.name,
            "config_sha256": config_sha,
            "weights_sha256": hashlib.sha256(listing).hexdigest(),
        }


def build_hf_backbone(cfg) -> HFVLMBackbone:
    """From an ``HFBackboneConfig``: weights from ``model_dir`` when set, else a random init of
    the named ``architecture`` (for benchmarks and tests; never for predictions you trust)."""
    if cfg.model_dir is None and cfg.architecture is None:
        raise ValueError("hf backbone: set model_dir (a local VLM directory) or architecture")
    return HFVLMBackbone(
        model_dir=cfg.model_dir,
        num_layers=cfg.num_layers,
        freeze_vision=cfg.freeze_vision,
        image_size=cfg.image_size,
        max_text_tokens=cfg.max_text_tokens,
        hf_config=None if cfg.model_dir else smolvlm2_config(cfg.architecture),
    )
