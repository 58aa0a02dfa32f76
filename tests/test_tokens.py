"""The encoder token interface: class token, registers and patches, a patch mask that enters as the mask token,
and a patch grid, for every registered ViT encoder with and without registers, and for CNNs."""

import pytest
import torch

from sslkit.encoders import Tokens
from sslkit.plugins import load_all
from sslkit.registry import ENCODERS

load_all()
SMALL = {"vit_tiny_patch4_32": {"depth": 1, "embed_dim": 32, "num_heads": 2},
         "vit_small_patch16_224": {"img_size": 32}, "vit_base_patch16_224": {"img_size": 32}}
VITS = [n for n in ENCODERS.names() if n.startswith("vit")]


def _build(name: str, registers: int, **kw):
    torch.manual_seed(0)
    return ENCODERS.build(name, **SMALL.get(name, {}), reg_tokens=registers, **kw).eval()


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("name,options", [*((n, {}) for n in VITS), ("vit_tiny_patch4_32", {"conv_stem": True})])
def test_vit_tokens_split_cls_registers_and_patches(name, options, registers):
    assert name in SMALL, f"give {name} a small size in this test"
    enc = _build(name, registers, **options)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = enc.forward_tokens(x)
        # What timm's own forward computes, split by hand: [cls, registers, patches].
        full = enc.model.forward_features(x)
    h, w = enc.patch_grid(32)
    assert isinstance(tokens, Tokens) and (h, w) == (32 // enc.patch_size,) * 2
    assert tokens.registers.shape == (2, registers, enc.dim) and enc.num_registers == registers
    assert tokens.patches.shape == (2, h * w, enc.dim), "registers are not part of the patch grid"
    torch.testing.assert_close(tokens.cls, full[:, 0])
    torch.testing.assert_close(tokens.registers, full[:, 1:1 + registers])
    torch.testing.assert_close(tokens.patches, full[:, 1 + registers:])
    torch.testing.assert_close(enc(x), tokens.cls if enc.pool == "token" else tokens.patches.mean(1))


@pytest.mark.parametrize("registers", [0, 2])
def test_masked_patches_enter_as_the_mask_token(registers):
    enc = _build("vit_tiny_patch4_32", registers)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, [0, 5, 63]] = True
    mask[1, 10:20] = True
    with pytest.raises(RuntimeError, match="enable_mask_token"):
        enc.forward_tokens(x, mask=mask)
    enc.enable_mask_token()
    with torch.no_grad():
        enc.mask_token.normal_()
        got = enc.forward_tokens(x, mask=mask)
        # Reference: the same forward with the masked embeddings replaced by hand.
        m = enc.model
        emb = m.patch_embed(x)  # (B, 8, 8, D)
        flat = emb.reshape(2, 64, -1).clone()
        flat[mask] = enc.mask_token.reshape(-1)
        t = m.blocks(m.norm_pre(m._pos_embed(flat.reshape(emb.shape))))
        want = m.norm(t)
        unmasked = enc.forward_tokens(x)
    torch.testing.assert_close(got.patches, want[:, 1 + registers:])
    torch.testing.assert_close(got.cls, want[:, 0])
    assert not torch.allclose(got.cls, unmasked.cls), "the mask changes what the encoder sees"
    with torch.no_grad():  # an all-false mask is the plain forward
        torch.testing.assert_close(enc.forward_tokens(x, mask=torch.zeros_like(mask)).patches, unmasked.patches)
    assert "mask_token" in enc.state_dict() and "mask_token" in enc.no_weight_decay()


def test_cnn_tokens_are_its_last_feature_map():
    enc = ENCODERS.build("resnet_cifar", widths=[8, 16, 32], depths=[1, 1, 1]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = enc.forward_tokens(x)
        fmap = enc.model.forward_features(x)  # (2, 32, 8, 8)
    assert enc.patch_size is None and enc.feature_stride == 4 and enc.patch_grid(32) == (8, 8)
    assert tokens.registers.shape == (2, 0, 32)
    torch.testing.assert_close(tokens.patches, fmap.flatten(2).transpose(1, 2))
    torch.testing.assert_close(tokens.cls, fmap.mean(dim=(2, 3)))
    with pytest.raises(TypeError, match="CNN"):
        enc.forward_tokens(x, mask=torch.zeros(2, 64, dtype=torch.bool))


def test_conv_stem_embeds_patches_with_stride_2_convolutions():
    """The convolutional stem (Xiao et al. 2021): 3x3 stride-2 convolutions with BatchNorm and ReLU, then a 1x1
    convolution, computed by hand; the token grid is the plain 4-px patch grid."""
    import torch.nn.functional as F

    enc = _build("vit_tiny_patch4_32", 0, conv_stem=True)
    convs = [m for m in enc.model.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in enc.model.patch_embed.proj if isinstance(m, torch.nn.BatchNorm2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1)] and [c.out_channels for c in convs] == [16, 32, 32]
    with torch.no_grad():
        for bn in norms:  # non-trivial running statistics
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        x = torch.randn(2, 3, 20, 20)
        y = x
        for conv, bn in zip(convs[:2], norms):
            y = F.relu(F.batch_norm(F.conv2d(y, conv.weight, stride=2, padding=1), bn.running_mean, bn.running_var,
                                    bn.weight, bn.bias, eps=bn.eps))
        y = F.conv2d(y, convs[2].weight, convs[2].bias)  # (2, D, 5, 5)
        got = enc.model.patch_embed(x)  # (2, 5, 5, D)
        torch.testing.assert_close(got, y.permute(0, 2, 3, 1))
        assert enc.patch_size == 4 and enc.patch_grid(20) == (5, 5)
        assert enc.forward_tokens(x).patches.shape == (2, 25, 32)
