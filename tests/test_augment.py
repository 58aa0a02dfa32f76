"""Contract tests over every registered augmentation, and the SimCLR paper's settings."""

import pytest
import torch
from torchvision.transforms import v2

from sslkit.config import factory_schema
from sslkit.plugins import load_all
from sslkit.registry import AUGMENTATIONS

load_all()


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
@pytest.mark.parametrize("src", [(28, 28), (40, 33)])
def test_augmentation_contract(name, src):
    pipe = AUGMENTATIONS.build(name)
    img = torch.randint(0, 256, (3, *src), dtype=torch.uint8)
    torch.manual_seed(0)
    views = pipe(img)
    assert len(views) == pipe.num_views == len(pipe.view_sizes)
    for v, s in zip(views, pipe.view_sizes):
        assert v.shape == (3, s, s) and v.dtype == torch.float32
        assert torch.isfinite(v).all()
    # Seeded the same way, a pipeline repeats itself (resume relies on this).
    torch.manual_seed(0)
    again = pipe(img)
    for a, b in zip(views, again):
        torch.testing.assert_close(a, b)
    # The factory signature is a valid recipe schema.
    factory_schema(AUGMENTATIONS.get(name).factory, "augment")


def _find(t, kind):
    if isinstance(t, kind):
        return [t]
    out = []
    for child in getattr(t, "transforms", []):
        out += _find(child, kind)
    return out


@pytest.mark.parametrize("preset,strength,blur", [("small", 0.5, False), ("imagenet", 1.0, True)])
def test_simclr_presets_follow_the_paper(preset, strength, blur):
    pipe = AUGMENTATIONS.build("simclr", image_size=32, preset=preset)
    view = pipe.transforms[0]
    (crop,) = _find(view, v2.RandomResizedCrop)
    assert crop.scale == (0.08, 1.0)
    (jitter,) = _find(view, v2.ColorJitter)
    assert jitter.brightness == pytest.approx((1 - 0.8 * strength, 1 + 0.8 * strength))
    assert jitter.hue == pytest.approx((-0.2 * strength, 0.2 * strength))
    (gray,) = _find(view, v2.RandomGrayscale)
    assert gray.p == 0.2
    assert bool(_find(view, v2.GaussianBlur)) == blur


def test_simclr_bad_scale_is_explained():
    with pytest.raises(ValueError, match="crop_scale"):
        AUGMENTATIONS.build("simclr", crop_scale=[0.9, 0.1])
