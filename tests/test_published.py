"""The published-μ0 port: parity with the reference's own outputs, its conventions, its strict
loader's errors, and serving it through `mu0 serve`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mu0_core.published import preprocess
from mu0_core.published.release import ReleaseError, load_release
from runtime.model_api import make_observation
from runtime.published_adapter import PublishedTraceModel, done_from_valid_prob
from tests.runtime_helpers import REPO, spawn_server

FIXTURE = REPO.parent / "shared" / "refparity"
needs_fixture = pytest.mark.skipif(
    not (FIXTURE / "outputs.npz").is_file(),
    reason=f"reference fixture {FIXTURE} absent (made by the reference code; see its README)",
)


@pytest.fixture(scope="module")
def release():
    return load_release(FIXTURE / "release", FIXTURE / "vlm", FIXTURE / "dino")


@needs_fixture
def test_parity_check_passes_on_the_reference_fixture() -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/check_reference_parity.py", str(FIXTURE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("traces_abs", "done_prob", "traces_abs_maskhist", "done_prob_maskhist"):
        assert result[key] <= 1e-4, (key, result)
    assert result["prefix_embs"] < 1e-4 and result["dino_feat"] < 1e-3


@needs_fixture
def test_depth_colormap_matches_the_reference_rendering() -> None:
    x = np.load(FIXTURE / "inputs.npz")
    lo, hi = x["depth_log_range"]
    for depth, want in zip(x["depth_m"], x["depth_rgb_raw"]):
        np.testing.assert_array_equal(preprocess.render_depth(depth, lo, hi), want)
    # Holes (0 and NaN) take the far end of the map, the nearest depth the bright end.
    out = preprocess.render_depth(np.array([[0.0, np.nan, np.exp(lo)]], np.float32), lo, hi)
    np.testing.assert_array_equal(out[0, 0], preprocess.TURBO_LUT[0])
    np.testing.assert_array_equal(out[0, 1], preprocess.TURBO_LUT[0])
    np.testing.assert_array_equal(out[0, 2], preprocess.TURBO_LUT[255])


@needs_fixture
def test_prompt_and_tokens_match_the_reference(release) -> None:
    x = np.load(FIXTURE / "inputs.npz")
    instructions = ["pick up the red cup", "  "]  # blank -> the reference's default task
    assert [preprocess.prompt(t) for t in instructions] == list(x["prompts"])
    tokens, mask = preprocess.tokenize(release.tokenizer, instructions, 48)
    np.testing.assert_array_equal(tokens.numpy(), x["lang_tokens"])
    np.testing.assert_array_equal(mask.numpy(), x["lang_mask"])


def test_uv_conversion_of_a_known_pixel() -> None:
    # Pixel column 320 of a 640-wide image (row 0 of 480): its centre is (2*320+1)/640 - 1 in
    # our convention and 2*320/640 - 1 = 0 in the reference's.
    ours = np.array([[(2 * 320 + 1) / 640 - 1, (2 * 0 + 1) / 480 - 1]], np.float32)
    ref = preprocess.ours_to_reference_uv(ours, 640, 480)
    np.testing.assert_allclose(ref, [[0.0, -1.0]], atol=1e-7)
    np.testing.assert_allclose(preprocess.reference_to_ours_uv(ref, 640, 480), ours, atol=1e-7)


def test_history_becomes_relative_past_with_unknown_steps_zeroed() -> None:
    W, H = 100, 50
    hist = np.zeros((2, 8, 3), np.float32)
    hist[:, :, 0] = np.linspace(-0.5, 0.2, 8)  # u moves right, the last step is current
    hist[:, :, 2] = 1.0
    valid = np.ones((2, 8), bool)
    valid[1, :-1] = False  # point 1: only its current position is known
    current, past, has = preprocess.history_to_reference(hist, valid, W, H, history_len=8)
    np.testing.assert_allclose(current[0], [0.2 - 1 / W, -1 / H, 1.0], atol=1e-6)
    # 7 past steps fill the newest 7 slots; the oldest reference slot is unknown (zero).
    np.testing.assert_allclose(past[0, 0], 0.0)
    np.testing.assert_allclose(past[0, 1:, 0], np.linspace(-0.5, 0.2, 8)[:-1] - 0.2, atol=1e-6)
    np.testing.assert_allclose(past[1], 0.0)
    assert has.tolist() == [True, False]


def test_done_starts_where_the_motion_is_no_longer_valid() -> None:
    p = np.array([[0.9, 0.6, 0.4, 0.7, 0.2], [0.9, 0.9, 0.9, 0.9, 0.9]])
    done = done_from_valid_prob(p, 0.5)
    assert done.tolist() == [[False, False, True, True, True], [False] * 5]


@needs_fixture
def test_the_port_is_frozen_and_fp32_with_dino_in_bf16(release) -> None:
    model = release.model
    assert not model.training
    assert sum(p.requires_grad for p in model.parameters()) == 0
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("dino.")} == {
        torch.float32
    }
    assert {p.dtype for p in model.dino.parameters()} == {torch.bfloat16}
    assert set(release.ignored_keys) == {
        "model.action_time_mlp_in.bias",
        "model.action_time_mlp_in.weight",
        "model.action_time_mlp_out.bias",
        "model.action_time_mlp_out.weight",
        "model.vlm_with_expert.vlm.lm_head.weight",
        "model.vlm_with_expert.vlm.model.text_model.norm.weight",
    }
    assert len(release.used_keys) + len(release.ignored_keys) == 217


@needs_fixture
def test_a_request_gets_the_same_traces_alone_or_batched(release) -> None:
    adapter = PublishedTraceModel(release, seed=3)
    a = make_observation(num_queries=4, image_size=(120, 90), seed=1)
    b = make_observation(num_queries=7, image_size=(64, 64), depth=False, seed=2)
    b["instruction"] = "open the drawer"
    alone = adapter.predict_batch([a])[0]
    together = adapter.predict_batch([b, a])[1]
    for key in ("traces_uvz", "traces_xyz_cam"):
        np.testing.assert_allclose(together[key], alone[key], atol=2e-5)
    np.testing.assert_array_equal(together["done"], alone["done"])
    # Depth changes the answer (it is used), and its absence is allowed.
    no_depth = adapter.predict_batch([{k: v for k, v in a.items() if k != "depth_m"}])[0]
    assert np.abs(no_depth["traces_uvz"] - alone["traces_uvz"]).max() > 1e-4


# ---------------------------------------------------------------- bad release directories
def _copy_fixture(tmp_path: Path) -> tuple[Path, Path, Path]:
    for name in ("release", "vlm", "dino"):
        shutil.copytree(FIXTURE / name, tmp_path / name)
        for f in (tmp_path / name).rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
    return tmp_path / "release", tmp_path / "vlm", tmp_path / "dino"


def _rewrite_weights(release_dir: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = release_dir / "final_ckpt" / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@needs_fixture
def test_a_missing_key_is_named(tmp_path) -> None:
    rel, vlm, dino = _copy_fixture(tmp_path)
    key = "model.trace_out_proj_future.weight"
    _rewrite_weights(rel, lambda t: t.pop(key))
    with pytest.raises(ReleaseError, match=r"lacks 1 tensor.*trace_out_proj_future\.weight"):
        load_release(rel, vlm, dino)


@needs_fixture
def test_a_wrong_shape_is_named(tmp_path) -> None:
    rel, vlm, dino = _copy_fixture(tmp_path)
    key = "model.vlm_with_expert.lm_expert.layers.1.self_attn.k_proj.weight"

    def edit(t):
        t[key] = torch.zeros(64, 32)

    _rewrite_weights(rel, edit)
    with pytest.raises(
        ReleaseError,
        match=r"layers\.1\.self_attn\.k_proj\.weight' has shape \[64, 32\].*\[64, 64\]",
    ):
        load_release(rel, vlm, dino)


@needs_fixture
def test_a_non_float_tensor_is_named(tmp_path) -> None:
    rel, vlm, dino = _copy_fixture(tmp_path)
    key = "model.trace_seg_embedding.weight"
    _rewrite_weights(rel, lambda t: t.update({key: torch.zeros(2, 32, dtype=torch.int64)}))
    with pytest.raises(
        ReleaseError, match=r"trace_seg_embedding\.weight' is I64, expected a float"
    ):
        load_release(rel, vlm, dino)


@needs_fixture
def test_an_unexpected_key_is_named(tmp_path) -> None:
    rel, vlm, dino = _copy_fixture(tmp_path)
    _rewrite_weights(rel, lambda t: t.update({"model.something_new.weight": torch.zeros(2)}))
    with pytest.raises(ReleaseError, match=r"unexpected key 'model\.something_new\.weight'"):
        load_release(rel, vlm, dino)


@needs_fixture
def test_a_missing_tokenizer_says_where_to_put_it(tmp_path) -> None:
    rel, vlm, dino = _copy_fixture(tmp_path)
    (vlm / "tokenizer.json").unlink()
    (vlm / "tokenizer_config.json").unlink()
    with pytest.raises(ReleaseError, match=r"no tokenizer in --vlm-dir .*tokenizer\.json"):
        load_release(rel, vlm, dino)


@needs_fixture
def test_stats_without_a_depth_range_are_refused(tmp_path) -> None:
    rel, vlm, dino = _copy_fixture(tmp_path)
    stats_path = rel / "normalizer_stats.json"
    stats = json.loads(stats_path.read_text())
    del stats["depth_log_min"], stats["depth_log_max"]
    stats_path.write_text(json.dumps(stats))
    with pytest.raises(ReleaseError, match=r"normalizer_stats\.json has no depth range"):
        load_release(rel, vlm, dino)


# ---------------------------------------------------------------- served by `mu0 serve`
@needs_fixture
def test_mu0_serve_hosts_the_port_and_matches_its_direct_output(tmp_path, release) -> None:
    from runtime.client import TraceClient

    proc, port = spawn_server(
        tmp_path,
        0,
        model=(
            "--checkpoint",
            str(FIXTURE / "release"),
            "--vlm-dir",
            str(FIXTURE / "vlm"),
            "--dino-dir",
            str(FIXTURE / "dino"),
            "--threads",
            "1",
        ),
        start_timeout_s=60.0,
    )
    obs = make_observation(num_queries=6, image_size=(96, 72), seed=5)
    try:
        with TraceClient(f"tcp://127.0.0.1:{port}") as client:
            meta = client.hello(timeout_s=30)
            reply = client.predict(obs, timeout_s=30)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert meta["model_id"] == "mu0-published" and meta["model_hash"] == release.content_hash
    # Same thread count as the server: bf16 DINOv2 features move by a rounding step when a
    # matmul is split differently, which shows as ~1e-4 in the traces.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        direct = PublishedTraceModel(release, seed=0).predict_batch([obs])[0]
    finally:
        torch.set_num_threads(threads)
    for key in ("traces_uvz", "traces_xyz_cam"):
        np.testing.assert_array_equal(reply[key], direct[key])
    np.testing.assert_array_equal(reply["done"], direct["done"])
    assert reply["traces_uvz"].shape == (6, 32, 3)


@needs_fixture
def test_mu0_info_and_predict_run_on_a_release(tmp_path, capsys) -> None:
    from runtime.cli import main

    dirs = [
        "--checkpoint",
        str(FIXTURE / "release"),
        "--vlm-dir",
        str(FIXTURE / "vlm"),
        "--dino-dir",
        str(FIXTURE / "dino"),
    ]
    assert main(["info", *dirs, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tensors_used"] == 211 and len(info["tensors_ignored"]) == 6
    assert info["params"]["trainable"] == 0 and info["horizon"] == 32
    out = tmp_path / "pred.png"
    assert (
        main(["predict", *dirs, "--example", "synthetic", "--num-points", "4", "--out", str(out)])
        == 0
    )
    assert "4 query points" in capsys.readouterr().out and out.stat().st_size > 0
    with pytest.raises(SystemExit, match="give --vlm-dir"):
        main(["info", "--checkpoint", str(FIXTURE / "release")])


# ---------------------------------------------------------------- the paper preset
def test_the_paper_preset_is_the_published_architecture_at_release_sizes() -> None:
    from configs import get_model_config
    from configs.models import is_published, trainable_config
    from mu0_core.published.preset import build_meta, describe, parameter_counts

    preset = get_model_config("paper")
    assert is_published(preset)
    model = build_meta(preset)  # meta device: no memory
    assert parameter_counts(model)["total"] == 2_483_182_126
    assert (model.num_vlm_layers, model.num_expert_layers, model.expert_dim) == (20, 20, 1024)
    assert model.cross_layers == set(range(1, 20, 2))
    assert describe(model)["prefix_tokens"] == 2 * 144 + 48
    with pytest.raises(SystemExit, match="published μ0's architecture"):
        trainable_config("paper")


def test_bench_of_a_miniature_published_preset_reports_counts_and_latency() -> None:
    from mu0_core.bench import bench_published
    from mu0_core.published.config import PublishedConfig, PublishedPreset

    tiny_dino = {
        "model_type": "dinov2",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "image_size": 28,
    }
    preset = PublishedPreset(
        name="mini",
        model=PublishedConfig(
            num_vlm_layers=2,
            num_expert_layers=2,
            image_size=64,
            dino_input_size=28,
            tokenizer_max_length=8,
        ),
        vlm_architecture="smolvlm2-256m",
        dino=tiny_dino,
    )
    out = bench_published(preset, queries=(3,), repeats=1, warmup=0)
    assert out["params_total"] > 1e8 and out["params_trainable"] == 0
    assert out["prefix_tokens"] == 2 * 1 + 8 and out["sample_ms_p50_q3"] > 0
