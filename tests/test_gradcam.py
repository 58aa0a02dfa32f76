"""Grad-CAM against its closed form on a tiny CNN, and the CLI on a tiny labelled run."""

from __future__ import annotations

import pytest
import torch

from sslkit.eval.linear import BN_EPS, LinearHeads
from sslkit.registry import ENCODERS
from sslkit.viz.gradcam import gradcam
from tests.eval.test_finetune import tiny_cnn_run


def test_gradcam_equals_the_closed_form_on_a_tiny_cnn():
    torch.manual_seed(0)
    enc = ENCODERS.build("resnet_cifar", widths=[4, 6], depths=[1, 1]).eval()  # global average pool, 6 channels
    g = torch.Generator().manual_seed(1)
    probe = LinearHeads(torch.randn(1, 6, 3, generator=g), torch.randn(1, 3, generator=g),
                        torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.5)
    images = torch.randn(2, 3, 12, 12, generator=g)
    maps, classes, probs = gradcam(enc, probe, images)
    with torch.no_grad():
        fmap = enc.model.forward_features(images)  # (B, K, h, w)
        pooled = fmap.mean(dim=(2, 3))  # (B, K)
        logits = ((pooled - probe.mean) / torch.sqrt(probe.var + BN_EPS)) @ probe.weight[0] + probe.bias[0]
    assert torch.equal(classes, logits.argmax(1))
    torch.testing.assert_close(probs, logits.softmax(1))
    # y_c = sum_k w_kc / s_k * mean_ij A_kij + const, so dy_c/dA_kij = w_kc / (s_k h w) at every position.
    h, w = fmap.shape[-2:]
    alpha = (probe.weight[0][:, classes] / torch.sqrt(probe.var + BN_EPS)[:, None]).T / (h * w)  # (B, K)
    cam = torch.relu((alpha[:, :, None, None] * fmap).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=(12, 12), mode="bilinear", align_corners=False)[:, 0]
    want = cam / cam.flatten(1).max(1).values[:, None, None]
    torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-6)
    # The class can be chosen; a ViT is refused.
    other = (classes + 1) % 3
    assert torch.equal(gradcam(enc, probe, images, other)[1], other)
    vit = ENCODERS.build("vit_tiny_patch4_32", depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(TypeError, match="CNN"):
        gradcam(vit, probe, images)


def test_cli_writes_the_grid_and_keeps_the_probe(tmp_path, capsys):
    from sslkit.cli import main

    run = tiny_cnn_run(tmp_path, num_samples=40, image_size=16)
    assert main(["viz", "gradcam", str(run), "--from-dataset", "3", "--no-progress"]) == 0
    assert (run / "gradcam" / "gradcam.png").is_file() and (run / "gradcam" / "probe.safetensors").is_file()
    stamp = (run / "gradcam" / "probe.safetensors").stat().st_mtime_ns
    assert main(["viz", "gradcam", str(run), "--from-dataset", "2", "--class", "1", "--no-progress"]) == 0
    assert (run / "gradcam" / "probe.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    assert main(["viz", "gradcam", str(run), "--from-dataset", "2", "--class", "nope", "--no-progress"]) == 2
    assert "is not a class" in capsys.readouterr().err
