"""The `hf` backbone on a tiny random SmolVLM saved to disk: loading, layer cut, prefix layout,
depth dropout, freezing, gradients, and the published SmolVLM2 architectures (on `meta`)."""

import hashlib

import pytest
import torch
from hf_fixtures import TINY_HF_CONFIG, fake_inputs, make_tiny_smolvlm_dir
from safetensors.torch import load_file

from mu0_core.backbones.hf import HFVLMBackbone, _ByteTokenizer, smolvlm2_config

B = 2
N_PATCH = 16  # (64 / 16)² patches of one image
N_IMG = 4  # after the connector's pixel shuffle (scale 2)
T = 32  # max_text_tokens default
C_VIS, D = 32, 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_smolvlm_dir(tmp_path_factory.mktemp("tiny_smolvlm"))


@pytest.fixture(scope="module")
def backbone(model_dir):
    torch.manual_seed(0)
    return HFVLMBackbone(model_dir, num_layers=2).eval()


@pytest.fixture(scope="module")
def frozen(backbone):
    rgb, depth_m, instructions = fake_inputs(B)
    return backbone.encode_frozen(rgb, depth_m, instructions)


def test_loads_local_dir_and_keeps_first_k_layers(backbone, model_dir):
    layers = backbone.vlm.text_model.layers
    assert len(layers) == 2 and backbone.num_layers == 2
    assert backbone.vlm.text_model.config.num_hidden_layers == 2
    assert not isinstance(backbone.tokenizer, _ByteTokenizer)
    assert not hasattr(backbone.vlm, "lm_head")  # the LM head is never built

    # The kept weights are the checkpoint's (hub layout: "model." prefix), not random.
    saved = load_file(str(model_dir / "model.safetensors"))
    for key in [
        "text_model.layers.1.self_attn.q_proj.weight",
        "text_model.embed_tokens.weight",
        "text_model.norm.weight",
        "connector.modality_projection.proj.weight",
        "vision_model.encoder.layers.1.mlp.fc1.weight",
    ]:
        torch.testing.assert_close(backbone.vlm.state_dict()[key], saved[f"model.{key}"])
    assert not any(k.startswith("text_model.layers.2.") for k in backbone.vlm.state_dict())

    prefixes = backbone.external_state_prefixes()
    assert prefixes == ("vlm.vision_model.",)
    keys = list(backbone.state_dict())
    assert any(k.startswith(prefixes[0]) for k in keys)


def test_fingerprint_names_dir_and_hashes_config(backbone, model_dir):
    fp = backbone.fingerprint()
    assert fp["source"] == model_dir.name
    assert (
        fp["config_sha256"] == hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    )
    assert len(fp["weights_sha256"]) == 64
    assert backbone.fingerprint() == fp


def test_frozen_features_keys_and_shapes(backbone, frozen):
    assert set(frozen) == {"rgb_vision", "depth_vision", "has_depth", "text_ids", "text_mask"}
    assert frozen["rgb_vision"].shape == (B, N_PATCH, C_VIS)
    assert frozen["depth_vision"].shape == (B, N_PATCH, C_VIS)
    assert frozen["has_depth"].tolist() == [True, True]
    assert frozen["text_ids"].shape == (B, T) and frozen["text_ids"].dtype == torch.long
    # WordLevel over known words: one token per word, no special tokens, padding masked.
    assert frozen["text_mask"].sum(dim=1).tolist() == [5, 10]
    assert frozen["text_ids"][0, :5].tolist() == [1, 2, 3, 4, 5]  # pick up the red cube
    assert not frozen["rgb_vision"].requires_grad


def test_prefix_shapes_and_masks(backbone, frozen):
    assert backbone.prefix_dim == D and backbone.point_feature_dim == C_VIS
    with torch.no_grad():
        prefix = backbone(frozen)
    P = 2 * N_IMG + T
    assert prefix.tokens.shape == (B, P, D) and prefix.tokens.dtype == torch.float32
    assert prefix.mask.shape == (B, P) and prefix.mask.dtype == torch.bool
    assert torch.isfinite(prefix.tokens).all()
    assert prefix.mask[:, : 2 * N_IMG].all()  # RGB and (present) depth tokens
    assert prefix.mask[:, 2 * N_IMG :].sum(dim=1).tolist() == [5, 10]
    (fmap,) = prefix.feature_maps
    assert fmap.shape == (B, C_VIS, 4, 4)
    # The map is the patch grid in image layout: row v, column u of the vision hidden states.
    torch.testing.assert_close(fmap[:, :, 1, 3], frozen["rgb_vision"][:, 1 * 4 + 3])


def test_depth_dropout_masks_exactly_the_depth_tokens(backbone, frozen):
    keep = torch.tensor([True, False])
    with torch.no_grad():
        full = backbone(frozen)
        dropped = backbone(frozen, depth_keep=keep)
    depth = slice(N_IMG, 2 * N_IMG)
    changed = full.mask != dropped.mask  # [B, P]
    assert changed[0].sum() == 0
    assert changed[1, depth].all() and changed[1].sum() == N_IMG
    assert not dropped.mask[1, depth].any()

    # Dropped depth is the same as no depth at all: same tokens where attended (positions
    # skip the masked slots, attention never reads them).
    rgb, _, instructions = fake_inputs(B)
    with torch.no_grad():
        no_depth = backbone(backbone.encode_frozen(rgb, None, instructions))
    assert not no_depth.mask[:, depth].any()
    m = dropped.mask[1]
    torch.testing.assert_close(dropped.tokens[1][m], no_depth.tokens[1][m], atol=1e-5, rtol=1e-5)
    # ... while depth does change the prefix of the sample that keeps it.
    assert not torch.allclose(full.tokens[0, :N_IMG], no_depth.tokens[0, :N_IMG], atol=1e-4)


def test_vision_frozen_connector_and_text_trainable(backbone):
    vision = backbone.frozen_modules()["vision"]
    assert vision is backbone.vlm.vision_model
    assert sum(p.numel() for p in vision.parameters() if p.requires_grad) == 0
    for module in [backbone.vlm.connector, backbone.vlm.text_model]:
        assert all(p.requires_grad for p in module.parameters())
    n_vision = sum(p.numel() for p in vision.parameters())
    n_total = sum(p.numel() for p in backbone.parameters())
    n_trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    assert n_trainable == n_total - n_vision

    backbone.train()
    try:
        assert not vision.training and backbone.vlm.text_model.layers[0].training
    finally:
        backbone.eval()


def test_gradients_reach_text_layers_not_vision(backbone, frozen):
    backbone.zero_grad(set_to_none=True)
    prefix = backbone(frozen, depth_keep=torch.tensor([True, False]))
    prefix.tokens[prefix.mask].pow(2).mean().backward()
    text = backbone.vlm.text_model
    for p in [
        text.layers[0].self_attn.q_proj.weight,
        text.layers[-1].mlp.down_proj.weight,
        backbone.vlm.connector.modality_projection.proj.weight,
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.vlm.vision_model.parameters())
    backbone.zero_grad(set_to_none=True)


def test_eval_outputs_are_deterministic(backbone):
    rgb, depth_m, instructions = fake_inputs(B, seed=3)
    with torch.no_grad():
        a = backbone(backbone.encode_frozen(rgb, depth_m, instructions))
        b = backbone(backbone.encode_frozen(rgb, depth_m, instructions))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.feature_maps[0], b.feature_maps[0])


def test_missing_dir_or_files_raise_helpful_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json.*safetensors.*tokenizer"):
        HFVLMBackbone(tmp_path / "nowhere", num_layers=2)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks weights \(\*\.safetensors\), tokenizer"):
        HFVLMBackbone(tmp_path, num_layers=2)


def test_num_layers_out_of_range_raises(model_dir):
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 4\]"):
        HFVLMBackbone(model_dir, num_layers=5)


def test_random_init_from_hf_config_builds_and_runs():
    bb = HFVLMBackbone(None, num_layers=3, hf_config=TINY_HF_CONFIG, max_text_tokens=8).eval()
    assert len(bb.vlm.text_model.layers) == 3
    assert isinstance(bb.tokenizer, _ByteTokenizer)
    assert bb.external_state_prefixes() == ()
    assert bb.fingerprint()["source"] == "random-init"
    rgb, depth_m, instructions = fake_inputs(B)
    frozen = bb.encode_frozen(rgb, depth_m, instructions)
    assert frozen["text_ids"].shape == (B, 8) and frozen["text_mask"].all()  # truncated bytes
    with torch.no_grad():
        prefix = bb(frozen)
    assert prefix.tokens.shape == (B, 2 * N_IMG + 8, D)
    assert torch.isfinite(prefix.tokens).all()


def test_trainable_vision_runs_in_forward():
    bb = HFVLMBackbone(None, num_layers=2, hf_config=TINY_HF_CONFIG, freeze_vision=False)
    assert bb.frozen_modules() == {}
    rgb, depth_m, instructions = fake_inputs(B)
    frozen = bb.encode_frozen(rgb, depth_m, instructions)
    assert frozen["rgb_pixels"].shape == (B, 3, 64, 64)
    prefix = bb(frozen)
    prefix.tokens[prefix.mask].pow(2).mean().backward()
    grad = bb.vlm.vision_model.encoder.layers[0].mlp.fc1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name, n_img, text_hidden, vision_hidden, total_m",
    [("smolvlm2-256m", 64, 576, 768, 256), ("smolvlm2-2.2b", 81, 2048, 1152, 2200)],
)
def test_smolvlm2_architectures_build_on_meta(name, n_img, text_hidden, vision_hidden, total_m):
    """The published sizes build with transformers without allocating weights."""
    from transformers import AutoModel

    from mu0_core.backbones.hf import _config_from_dict

    config = _config_from_dict(smolvlm2_config(name))
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    lm_head = config.text_config.vocab_size * text_hidden  # in the published count, not built here
    assert abs((n_params + lm_head) / 1e6 - total_m) / total_m < 0.03, n_params
    assert model.config.text_config.hidden_size == text_hidden
    assert model.config.vision_config.hidden_size == vision_hidden
    assert model.image_seq_len == n_img
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing was allocated


@pytest.mark.parametrize("max_text_tokens, depth_keep", [(32, [True, False]), (8, None)])
def test_sdpa_and_eager_attention_agree(max_text_tokens, depth_keep):
    """The bidirectional mask means the same in both attention implementations, with padding
    and without any (8 byte tokens fill the text slots: a mask transformers could skip, which
    would leave SDPA running the decoder's causal default)."""
    rgb, depth_m, instructions = fake_inputs(B)
    keep = None if depth_keep is None else torch.tensor(depth_keep)
    tokens = {}
    for impl in ["sdpa", "eager"]:
        torch.manual_seed(0)
        bb = HFVLMBackbone(
            None,
            2,
            hf_config=TINY_HF_CONFIG,
            max_text_tokens=max_text_tokens,
            config_overrides={"text_config": {"_attn_implementation": impl}},
        ).eval()
        with torch.no_grad():
            prefix = bb(bb.encode_frozen(rgb, depth_m, instructions), keep)
        assert prefix.mask.all() == (depth_keep is None)
        tokens[impl] = prefix.tokens[prefix.mask]
    torch.testing.assert_close(tokens["sdpa"], tokens["eager"], atol=1e-5, rtol=1e-5)


def test_image_size_override_changes_the_patch_grid():
    bb = HFVLMBackbone(None, 1, hf_config=TINY_HF_CONFIG, image_size=96).eval()
    assert bb.num_image_tokens == 9  # 96 / 16 = 6 patches a side → 3x3 after pixel shuffle
    rgb, depth_m, instructions = fake_inputs(B)
    with torch.no_grad():
        prefix = bb(bb.encode_frozen(rgb, depth_m, instructions))
    assert prefix.tokens.shape == (B, 2 * 9 + T, D)
    assert prefix.feature_maps[0].shape == (B, C_VIS, 6, 6)
    with pytest.raises(ValueError, match="scale_factor"):
        HFVLMBackbone(None, 1, hf_config=TINY_HF_CONFIG, image_size=48)  # 3 patches a side
