"""sslkit export: timm weights that timm's one-line call loads (every registered encoder), ONNX within 1e-4, the
model card, and clear errors for the wrong file (sslkit.export)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from sslkit.cli import main as sslkit_main
from sslkit.config import resolve
from sslkit.export import ExportError, export_onnx, export_run, export_timm, load_timm
from sslkit.registry import ENCODERS
from sslkit.run import build_encoder, save_encoder

# Every registered encoder, with small arguments where its defaults are slow on two cores. A new encoder fails
# test_every_encoder_has_a_case until it is added here.
CASES = {
    "resnet18_cifar": ({}, 16),
    "resnet_cifar": ({"widths": [8, 16, 24], "depths": [1, 2, 1], "stem_stride": 2, "pool_grid": 2}, 32),
    "vit_tiny_patch4_32": ({"depth": 2, "embed_dim": 64, "num_heads": 2, "reg_tokens": 2}, 32),
    "resnet50": ({}, 64),
    "vit_small_patch16_224": ({"img_size": 64, "pool": "avg"}, 64),
    "vit_base_patch16_224": ({"img_size": 32}, 32),
}
SLOW = {"resnet50", "vit_small_patch16_224", "vit_base_patch16_224"}  # 25-86M parameters written and read back
# Variants whose weights go through another timm architecture: "<encoder>[<variant>]".
VARIANTS = {"vit_tiny_patch4_32[conv_stem]": ({"img_size": 28, "depth": 1, "embed_dim": 64, "num_heads": 2,
                                                  "conv_stem": True}, 28)}


def _case(case: str) -> tuple[str, dict, int]:
    kw, size = {**CASES, **VARIANTS}[case]
    return case.split("[")[0], kw, size


def _perturbed(name: str, kw: dict) -> torch.nn.Module:
    """The encoder with every parameter and float buffer moved off its initial value, so that a weight timm
    failed to load (left at its own initialisation) shows in the features."""
    torch.manual_seed(0)
    enc = ENCODERS.build(name, **kw).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in [*enc.parameters(), *enc.buffers()]:
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g)).abs_() if t.dim() == 1 else \
                    t.add_(0.05 * torch.randn(t.shape, generator=g))
    return enc


def test_every_encoder_has_a_case():
    assert sorted(CASES) == ENCODERS.names()


@pytest.mark.parametrize("case", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in [*CASES, *VARIANTS]])
def test_timm_one_line_call_gives_sslkit_features(case, tmp_path):
    name, kw, size = _case(case)
    enc = _perturbed(name, kw)
    export_timm(enc, size, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")),
                              **cfg["model_args"]).eval()
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(model.state_dict())  # no key left over
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = enc(x)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_timm(tmp_path)(x), want, atol=1e-5, rtol=1e-5)
        local = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()  # timm's own folder loader
        torch.testing.assert_close(local(x), want, atol=1e-5, rtol=1e-5)
    assert list(local.pretrained_cfg["input_size"]) == [3, size, size]  # config.json's preprocessing


@pytest.mark.parametrize("case", ["resnet_cifar", "vit_tiny_patch4_32", "vit_tiny_patch4_32[conv_stem]"])
def test_onnx_matches_torch(case, tmp_path):
    import onnxruntime as ort

    name, kw, size = _case(case)
    enc = _perturbed(name, kw)
    entry = export_onnx(enc, size, tmp_path)
    runner = ort.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(3))  # another batch size
    got = runner.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        want = enc(x).numpy()
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4
    assert entry["onnx_max_abs_diff"] <= 1e-4


def hand_made_run(run: Path) -> Path:
    """A run directory made by hand: a small resnet_cifar with random weights (seed 0) on 24 synthetic images."""
    run.mkdir(parents=True)
    cfg = resolve({"name": "tiny", "data": {"name": "synthetic", "args": {"num_samples": 24, "image_size": 32}},
                   "encoder": {"name": "resnet_cifar", "widths": [8, 16], "depths": [1, 1]}})
    torch.manual_seed(0)
    save_encoder(build_encoder(cfg), run / "encoder.safetensors")
    OmegaConf.save(cfg, run / "config.yaml")
    return run


@pytest.fixture
def run_dir(tmp_path):
    return hand_made_run(tmp_path / "runs" / "tiny-1")


def test_export_command_card_and_formats(run_dir, tmp_path, capsys):
    from sslkit.eval import run_knn

    knn = run_knn(run_dir, k=[5], plots=False, progress=False)
    out = tmp_path / "export"
    assert sslkit_main(["export", str(run_dir), "--format", "timm", "--out", str(out)]) == 0
    assert "model card" in capsys.readouterr().out
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["architecture"] == "sslkit_resnet_cifar" and manifest["timm_max_abs_diff"] <= 1e-5
    import hashlib

    assert manifest["sha256"]["model.safetensors"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    card = (out / "MODEL_CARD.md").read_text()
    assert f"{knn['metrics']['5']['top1']:.2f}" in card and "sslkit export" in card and "resnet_cifar" in card

    # safetensors: sslkit's own layout, evaluated like the run with the same numbers
    res = export_run(run_dir, "safetensors", tmp_path / "own")
    again = run_knn(res["out_dir"], k=[5], plots=False, progress=False)
    assert again["metrics"] == knn["metrics"]

    assert sslkit_main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    assert (tmp_path / "onnx" / "encoder.onnx").is_file()
    assert sslkit_main(["export", str(run_dir), "--out", str(run_dir)]) == 2  # never over the run's own files
    assert "run directory itself" in capsys.readouterr().err


def test_wrong_files_are_errors(run_dir, tmp_path):
    good = export_run(run_dir, "timm", tmp_path / "good")["out_dir"]
    other = tmp_path / "other"  # another architecture's export
    export_timm(ENCODERS.build("vit_tiny_patch4_32", depth=1, embed_dim=32, num_heads=2), 32, other)

    mixed = tmp_path / "mixed"  # config of one export, weights of the other
    mixed.mkdir()
    (mixed / "config.json").write_bytes((tmp_path / "good" / "config.json").read_bytes())
    (mixed / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ExportError, match="holds vit_tiny_patch16_224 weights"):
        load_timm(mixed)

    wider = tmp_path / "wider"  # same architecture, other widths: every mismatched key is named
    export_timm(ENCODERS.build("resnet_cifar", widths=[8, 32], depths=[1, 1]), 32, wider)
    (wider / "config.json").write_bytes((tmp_path / "good" / "config.json").read_bytes())
    with pytest.raises(ExportError, match="shape mismatch for .*file .* vs model"):
        load_timm(wider)

    ckpt = tmp_path / "ckpt"  # a training checkpoint in place of the weights
    ckpt.mkdir()
    (ckpt / "config.json").write_bytes((tmp_path / "good" / "config.json").read_bytes())
    torch.save({"format": "sslkit", "objective": {"w": torch.zeros(1)}}, ckpt / "model.safetensors")
    with pytest.raises(ExportError, match="training checkpoint"):
        load_timm(ckpt)

    data = (tmp_path / "good" / "model.safetensors").read_bytes()
    (tmp_path / "good" / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ExportError, match="truncated"):
        load_timm(good)
    with pytest.raises(ExportError, match="no config.json"):
        load_timm(tmp_path)

    extra = tmp_path / "extra"  # a state dict with keys the model lacks (sslkit's model.* prefix, as before)
    extra.mkdir()
    (extra / "config.json").write_bytes((other / "config.json").read_bytes())
    save_file({f"model.{k}": v for k, v in load_file(str(other / "model.safetensors")).items()},
              str(extra / "model.safetensors"))
    with pytest.raises(ExportError, match="unexpected .* key"):
        load_timm(extra)
