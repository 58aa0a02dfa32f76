"""extract_features: shapes, eval mode, batch-size independence, fast path == per-image path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sslkit.augment.base import eval_transform
from sslkit.data.base import TensorImageDataset
from sslkit.eval.features import batch_eval_view, extract_features


class TinyEncoder(nn.Module):
    """Conv + BatchNorm + dropout, so train and eval mode give different outputs."""

    is_vit = False

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5))
        self.dim = dim
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


class PlainDataset(torch.utils.data.Dataset):
    """Same items as a TensorImageDataset, without the fast path."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def tiny_dataset(n=10, size=12, channels=1):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    return TensorImageDataset(images, torch.arange(n) % 3, ["a", "b", "c"], "tiny")


@pytest.mark.parametrize("training", [True, False])
def test_shape_labels_and_mode_restored(training):
    enc, ds = TinyEncoder(), tiny_dataset()
    enc.train(training)
    feats, labels = extract_features(enc, ds, image_size=12, batch_size=4, progress=False)
    assert feats.shape == (10, 6) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert torch.equal(labels, torch.arange(10) % 3)
    assert enc.training is training
    assert all(m.training is training for m in enc.modules())
    assert enc.calls == 3  # ceil(10 / 4) batches


def test_batch_size_independent():
    enc, ds = TinyEncoder(), tiny_dataset(n=9)
    a, _ = extract_features(enc, ds, image_size=16, batch_size=1, progress=False)
    b, _ = extract_features(enc, ds, image_size=16, batch_size=7, progress=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [12, 20])
def test_fast_path_matches_per_image_path(size):
    enc, ds = TinyEncoder(), tiny_dataset(n=5, size=12, channels=3)
    fast, y1 = extract_features(enc, ds, image_size=size, batch_size=3, progress=False)
    slow, y2 = extract_features(enc, PlainDataset(ds), image_size=size, batch_size=3, progress=False)
    assert torch.equal(y1, y2)
    # The per-image transform resizes uint8 (rounding to integers): allow ~1 grey level of difference.
    torch.testing.assert_close(fast, slow, atol=0.02 if size != 12 else 1e-6, rtol=0)


def test_batch_eval_view_matches_eval_transform_nonsquare():
    img = torch.randint(0, 256, (1, 3, 40, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    fast = batch_eval_view(img, 16)[0]
    slow = eval_transform(16)(img[0])
    assert fast.shape == slow.shape == (3, 16, 16)
    assert (fast - slow).abs().max() < 0.05  # uint8 rounding inside torchvision's resize


def test_empty_dataset_and_bad_batch():
    enc = TinyEncoder()
    empty = TensorImageDataset(torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0), [], "empty")
    feats, labels = extract_features(enc, empty, image_size=8, progress=False)
    assert feats.shape == (0, 6) and labels.shape == (0,)
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(enc, empty, image_size=8, batch_size=0, progress=False)


def test_bf16_and_channels_last_close_to_fp32_and_layout_restored():
    enc, ds = TinyEncoder(), tiny_dataset(n=6, channels=3)
    ref, _ = extract_features(enc, ds, image_size=12, progress=False)
    fast, _ = extract_features(enc, ds, image_size=12, progress=False, bf16=True)  # channels_last follows on CPU
    torch.testing.assert_close(fast, ref, atol=0.05, rtol=0.05)
    assert not torch.equal(fast, ref)  # it really ran in bf16
    assert enc.net[0].weight.is_contiguous()  # memory format restored
