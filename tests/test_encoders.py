"""Contract tests over every registered encoder: a new encoder is tested the moment it is registered."""

import pytest
import torch

from sslkit.registry import ENCODERS, load_all

load_all()
# Small inputs keep the big models cheap; ViTs interpolate their position embeddings (dynamic_img_size).
SIZE = {"resnet50": 64, "vit_small_patch16_224": 64, "vit_base_patch16_224": 32}


@pytest.mark.parametrize("name", ENCODERS.names() + ["timm:resnet10t"])
def test_encoder_contract(name):
    torch.manual_seed(0)
    enc = ENCODERS.build(name)
    size = SIZE.get(name, 32)
    x = torch.randn(2, 3, size, size)
    y = enc(x)
    assert y.shape == (2, enc.dim)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "every parameter must receive a gradient"
    assert any(g.abs().sum() > 0 for g in grads)
    if enc.is_vit:
        cls, patches = enc.forward_tokens(x)
        assert cls.shape == (2, enc.dim)
        assert patches.shape == (2, (size // enc.patch_size) ** 2, enc.dim)


def test_vit_keep_runs_only_visible_tokens_and_matches_full_when_all_kept():
    torch.manual_seed(0)
    enc = ENCODERS.build("vit_tiny_patch4_32", depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    L = 64
    keep_all = torch.arange(L).expand(2, L)
    full_cls, full_p = enc.forward_tokens(x)
    cls, p = enc.forward_tokens(x, keep=keep_all)
    torch.testing.assert_close(cls, full_cls)
    torch.testing.assert_close(p, full_p)
    keep = torch.stack([torch.randperm(L)[:16] for _ in range(2)])
    _, p16 = enc.forward_tokens(x, keep=keep)
    assert p16.shape == (2, 16, enc.dim)


def test_resnet18_cifar_stem():
    enc = ENCODERS.build("resnet18_cifar")
    assert enc.model.conv1.kernel_size == (3, 3) and enc.model.conv1.stride == (1, 1)
    assert isinstance(enc.model.maxpool, torch.nn.Identity)
    assert enc.dim == 512


def test_unknown_timm_model_is_named():
    with pytest.raises(ValueError, match="timm has no model 'resnet_nope'"):
        ENCODERS.build("timm:resnet_nope")


@pytest.mark.parametrize("name", ["vit_tiny_patch4_32", "vit_small_patch16_224"])
def test_vit_avg_pool_uses_normalised_tokens(name):
    enc = ENCODERS.build(name, pool="avg").eval()
    x = torch.randn(2, 3, 32, 32)
    cls, patches = enc.forward_tokens(x)
    torch.testing.assert_close(enc(x), patches.mean(dim=1))
    # LayerNorm output (affine at init: weight 1, bias 0) has zero mean and unit std per token.
    torch.testing.assert_close(patches.mean(-1), torch.zeros(2, patches.shape[1]), atol=1e-5, rtol=0)
