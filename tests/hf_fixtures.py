"""A tiny random SmolVLM checkpoint on disk, laid out like a real hub download, built offline.

The weights are saved from ``SmolVLMForConditionalGeneration`` (as the published checkpoints are:
``model.`` key prefix plus an ``lm_head``), with a WordLevel tokenizer over a few words and a
preprocessor config, so the backbone's real local-directory loading path is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["pick", "up", "the", "red", "cube", "open", "drawer", "put", "in", "bowl", "and"]

# Text 64 wide, 4 layers; vision 32 wide, 2 layers; 64 px / patch 16 = 4x4 patches → 2x2 = 4
# image tokens after the connector's pixel shuffle (scale 2).
TINY_HF_CONFIG = {
    "model_type": "smolvlm",
    "scale_factor": 2,
    "image_token_id": 99,
    "text_config": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "max_position_embeddings": 256,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "patch_size": 16,
        "image_size": 64,
    },
}


def make_tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0} | {w: i + 1 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def make_tiny_smolvlm_dir(path: Path, seed: int = 0) -> Path:
    """Write config.json, model.safetensors, tokenizer files and preprocessor_config.json."""
    from transformers import SmolVLMForConditionalGeneration

    from mu0_core.backbones.hf import _config_from_dict

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(_config_from_dict(TINY_HF_CONFIG))
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    )
    return path


def fake_inputs(B: int = 2, H: int = 48, W: int = 80, seed: int = 0):
    """uint8 RGB [B, H, W, 3], depth [B, H, W] metres (with some invalid pixels), instructions."""
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (B, H, W, 3), generator=g, dtype=torch.uint8)
    depth_m = 0.3 + 1.5 * torch.rand(B, H, W, generator=g)
    depth_m[:, :4] = 0.0  # a band of unknown depth
    instructions = ["pick up the red cube", "open the drawer and put the cube in the bowl"][:B]
    instructions += ["pick up"] * (B - len(instructions))
    return rgb, depth_m, instructions
