"""The ViT attention kernel choice (trainer.attention): fused SDPA or timm's math path, the same attention."""

import json
import math

import pytest
import torch

from sslkit.config import ConfigError, resolve
from sslkit.encoders import fused_attention_wanted, restore_attention, set_fused_attention
from sslkit.engine import train
from sslkit.eval.features import extract_features
from sslkit.plugins import load_all
from sslkit.registry import DATASETS, ENCODERS
from tests.test_mae import _mae  # the tiny MAE (2-block 64-d ViT, 1-block decoder)

load_all()


def _flags(module: torch.nn.Module) -> list[bool]:
    return [m.fused_attn for m in module.modules() if isinstance(getattr(m, "fused_attn", None), bool)]


@pytest.mark.parametrize("mode,device,bf16,want", [
    ("auto", "cpu", True, False),  # the measured exception: math on a CPU under bf16 autocast
    ("auto", "cpu", False, True),
    ("auto", "cuda", True, True),
    ("auto", "cuda", False, True),
    ("fused", "cpu", True, True),
    ("math", "cuda", False, False),
])
def test_auto_picks_math_only_on_cpu_bf16(mode, device, bf16, want):
    assert fused_attention_wanted(mode, device, bf16) is want


def test_unknown_mode_is_refused_in_code_and_recipe():
    with pytest.raises(ValueError, match="auto, fused, math"):
        fused_attention_wanted("flash", "cpu", True)
    with pytest.raises(ConfigError, match="trainer.attention"):
        resolve({"trainer": {"attention": "flash"}})


def test_switch_reaches_encoder_and_decoder_and_restores():
    mae = _mae()
    n_layers = len(mae.encoder.model.blocks) + len(mae.decoder.blocks)
    before = set_fused_attention(mae, False)
    assert len(before) == n_layers and _flags(mae) == [False] * n_layers
    restore_attention(before)
    assert _flags(mae) == [True] * n_layers  # timm's default on this torch
    assert set_fused_attention(ENCODERS.build("resnet_cifar", widths=[8, 16], depths=[1, 1]), False) == {}


@pytest.mark.parametrize("autocast", [False, True])
def test_math_and_fused_give_the_same_loss_and_gradients(autocast):
    """The same MAE step (same masks) through both kernels: equal loss and gradients within rounding."""
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    results = []
    for fused in (True, False):
        mae = _mae(seed=0)
        set_fused_attention(mae, fused)
        torch.manual_seed(5)  # the masks
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = mae([x])["loss"]
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in mae.parameters() if p.grad is not None])
        results.append((loss.detach(), grads))
    (l_f, g_f), (l_m, g_m) = results
    tol = 2e-2 if autocast else 1e-5  # bf16 rounds the two kernels' intermediates differently
    assert torch.allclose(l_f, l_m, rtol=tol, atol=tol)
    assert (g_f - g_m).norm() <= tol * g_f.norm() * (5 if autocast else 10)
    assert l_f.item() > 0.1  # a real reconstruction loss, not a degenerate zero


def test_feature_extraction_is_unchanged_and_restores_the_setting():
    enc = ENCODERS.build("vit_tiny_patch4_32", depth=2, embed_dim=64, num_heads=2).eval()
    ds = DATASETS.build("synthetic", num_samples=16, image_size=32)
    plain, _ = extract_features(enc, ds, image_size=32, progress=False)
    bf16, _ = extract_features(enc, ds, image_size=32, progress=False, bf16=True)  # math path inside
    assert _flags(enc) == [True, True]
    set_fused_attention(enc, False)
    math_fp32, _ = extract_features(enc, ds, image_size=32, progress=False)
    assert torch.allclose(plain, math_fp32, atol=1e-5)
    assert torch.nn.functional.cosine_similarity(plain, bf16).min() > 0.99


@pytest.mark.parametrize("precision,mode,want", [("bf16-mixed", "auto", "math"), ("32-true", "auto", "fused"),
                                                 ("bf16-mixed", "fused", "fused")])
def test_engine_applies_the_choice_and_records_it(tiny_recipe, precision, mode, want):
    raw = tiny_recipe(name=f"att_{precision}_{mode}", augment={"name": "mae", "image_size": 32},
                      trainer={"precision": precision, "attention": mode, "epochs": 1},
                      data={"args": {"num_samples": 32, "image_size": 32}})
    raw["objective"] = {"name": "mae", "decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4}
    cfg = resolve(raw)
    res = train(cfg)
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert summary["attention"] == want
    assert math.isfinite(summary["final_loss"])
