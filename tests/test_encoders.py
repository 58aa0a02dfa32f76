"""Contract tests over every registered encoder: a new encoder is tested the moment it is registered."""

import pytest
import torch

from sslkit.plugins import load_all
from sslkit.registry import ENCODERS

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
        cls, _, patches = enc.forward_tokens(x)
        assert cls.shape == (2, enc.dim)
        assert patches.shape == (2, (size // enc.patch_size) ** 2, enc.dim)


def test_vit_keep_runs_only_visible_tokens_and_matches_full_when_all_kept():
    torch.manual_seed(0)
    enc = ENCODERS.build("vit_tiny_patch4_32", depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    L = 64
    keep_all = torch.arange(L).expand(2, L)
    full_cls, _, full_p = enc.forward_tokens(x)
    cls, _, p = enc.forward_tokens(x, keep=keep_all)
    torch.testing.assert_close(cls, full_cls)
    torch.testing.assert_close(p, full_p)
    keep = torch.stack([torch.randperm(L)[:16] for _ in range(2)])
    _, _, p16 = enc.forward_tokens(x, keep=keep)
    assert p16.shape == (2, 16, enc.dim)


def test_resnet18_cifar_stem():
    enc = ENCODERS.build("resnet18_cifar")
    assert enc.model.conv1.kernel_size == (3, 3) and enc.model.conv1.stride == (1, 1)
    assert isinstance(enc.model.maxpool, torch.nn.Identity)
    assert enc.dim == 512


def test_resnet_cifar_default_is_the_cifar_resnet18():
    torch.manual_seed(0)
    a = ENCODERS.build("resnet18_cifar")
    torch.manual_seed(0)
    b = ENCODERS.build("resnet_cifar")
    shapes_a = [(n.replace("model.", ""), tuple(p.shape)) for n, p in a.named_parameters()]
    shapes_b = [(n.replace("model.", ""), tuple(p.shape)) for n, p in b.named_parameters()]
    assert sorted(shapes_a) == sorted(shapes_b)
    assert b.dim == 512


@pytest.mark.parametrize(("widths", "depths", "stride", "size"), [([32, 64, 128, 256], [1, 1, 1, 1], 1, 28),
                                                                  ([16, 32, 64], [2, 1, 1], 2, 28),
                                                                  ([8, 16], [1, 3], 1, 16)])
def test_resnet_cifar_shapes_and_resolution(widths, depths, stride, size):
    enc = ENCODERS.build("resnet_cifar", widths=widths, depths=depths, stem_stride=stride).eval()
    assert enc.dim == widths[-1]
    stages = [getattr(enc.model, f"layer{i + 1}") for i in range(len(widths))]
    assert [len(s) for s in stages] == depths
    x = torch.randn(2, 3, size, size)
    feats = enc.model.forward_features(x)  # (B, C, h, w): each stage after the first halves the resolution
    expect = -(-size // stride)
    for _ in widths[1:]:
        expect = -(-expect // 2)
    assert feats.shape == (2, widths[-1], expect, expect)
    assert enc(x).shape == (2, widths[-1])
    # A narrow, shallow net costs a fraction of the ResNet-18's parameters.
    assert sum(p.numel() for p in enc.parameters()) < 0.2 * 11.2e6


@pytest.mark.parametrize(("grid", "size"), [(2, 20), (2, 28), (3, 32)])
def test_resnet_cifar_pool_grid_keeps_a_coarse_layout(grid, size):
    """pool_grid g: the last map average-pooled to g x g and flattened channel-major (dim widths[-1] * g * g)."""
    torch.manual_seed(0)
    enc = ENCODERS.build("resnet_cifar", widths=[8, 16], depths=[1, 1], pool_grid=grid).eval()
    assert enc.dim == 16 * grid * grid
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        fmap = enc.model.forward_features(x)  # (B, 16, h, w)
        want = torch.stack([torch.stack([fmap[:, :, (i * fmap.shape[2]) // grid:-(-((i + 1) * fmap.shape[2]) // grid),
                                              (j * fmap.shape[3]) // grid:-(-((j + 1) * fmap.shape[3]) // grid)]
                                         .mean(dim=(2, 3)) for j in range(grid)], dim=-1)
                            for i in range(grid)], dim=-2).flatten(1)  # (B, 16 * g * g), PyTorch's bin edges
        assert torch.allclose(enc(x), want, atol=1e-5)
    # A flipped image lands in mirrored cells: the feature is not flip-invariant, unlike the global pool.
    with torch.no_grad():
        assert not torch.allclose(enc(x), enc(x.flip(-1)), atol=1e-3)


@pytest.mark.parametrize("bad", [{"widths": [32, 64], "depths": [1]}, {"widths": [], "depths": []},
                                 {"stem_stride": 4}, {"depths": [1, 0, 1, 1]}, {"pool_grid": 0}])
def test_resnet_cifar_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match="resnet_cifar"):
        ENCODERS.build("resnet_cifar", **bad)


@pytest.mark.parametrize("name", ENCODERS.names())
def test_deep_copy_runs_its_own_weights(name):
    """DINO's teacher is a deep copy: it must compute with its own parameters and buffers, not the original's
    (a forward patched in as a closure would silently keep using the original module)."""
    import copy

    torch.manual_seed(0)
    enc = ENCODERS.build(name)
    twin = copy.deepcopy(enc)
    size = SIZE.get(name, 32)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5).add_(0.01)
        assert not torch.allclose(enc(x), twin(x))
    bns = [m for m in twin.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if bns:  # train-mode forwards update the copy's running statistics, not the original's
        assert all(int(m.num_batches_tracked) == 1 for m in bns)
        assert all(int(m.num_batches_tracked) == 1 for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_unknown_timm_model_is_named():
    with pytest.raises(ValueError, match="timm has no model 'resnet_nope'"):
        ENCODERS.build("timm:resnet_nope")


@pytest.mark.parametrize(("grid", "size"), [(2, 20), (5, 20), (3, 28)])
def test_vit_grid_pool_flattens_the_pooled_patch_grid(grid, size):
    """pool "grid": the patch tokens laid out on their h x w grid, average-pooled to g x g with PyTorch's bin
    edges and flattened channel-major, as resnet_cifar's pool_grid (dim = D * g * g); no timm model gives it."""
    torch.manual_seed(0)
    enc = ENCODERS.build("vit_tiny_patch4_32", depth=1, pool="grid", pool_grid=grid).eval()
    assert enc.dim == 192 * grid * grid and enc.timm_config is None
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        patches = enc.forward_tokens(x).patches  # (B, h * w, D), row-major
        h = size // 4
        fmap = patches.reshape(2, h, h, 192)
        cells = [fmap[:, (i * h) // grid:-(-((i + 1) * h) // grid), (j * h) // grid:-(-((j + 1) * h) // grid)]
                 .mean(dim=(1, 2)) for i in range(grid) for j in range(grid)]  # each (B, D)
        want = torch.stack(cells, dim=-1).flatten(1)  # (B, D * g * g): channel-major
        torch.testing.assert_close(enc(x), want, atol=1e-5, rtol=1e-5)
        if grid == h:  # the whole grid: every patch token, in place
            torch.testing.assert_close(enc(x), patches.transpose(1, 2).flatten(1))


@pytest.mark.parametrize("bad", [{"pool": "max"}, {"pool": "grid", "pool_grid": 0},
                                 {"pool": "grid", "pool_grid": 1.5}])
def test_vit_rejects_unknown_pooling(bad):
    with pytest.raises(ValueError, match="pool"):
        ENCODERS.build("vit_tiny_patch4_32", depth=1, **bad)


@pytest.mark.parametrize("name", ["vit_tiny_patch4_32", "vit_small_patch16_224"])
def test_vit_avg_pool_uses_normalised_tokens(name):
    enc = ENCODERS.build(name, pool="avg").eval()
    x = torch.randn(2, 3, 32, 32)
    cls, _, patches = enc.forward_tokens(x)
    torch.testing.assert_close(enc(x), patches.mean(dim=1))
    # LayerNorm output (affine at init: weight 1, bias 0) has zero mean and unit std per token.
    torch.testing.assert_close(patches.mean(-1), torch.zeros(2, patches.shape[1]), atol=1e-5, rtol=0)
