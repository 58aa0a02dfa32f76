"""Multi-crop view pipeline: views, sizes, order, per-view blur/solarisation, presets, recipe schema."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from sslkit.augment.base import ViewPipeline
from sslkit.config import ConfigError, resolve
from sslkit.plugins import load_all
from sslkit.registry import AUGMENTATIONS

load_all()


def ops(view: v2.Compose) -> list[v2.Transform]:
    """Flatten a view's Compose, unwrapping RandomApply into (inner transform, p) pairs."""
    flat = []
    for t in view.transforms:
        if isinstance(t, v2.RandomApply):
            flat += [(inner, t.p) for inner in t.transforms]
        else:
            flat.append((t, getattr(t, "p", 1.0)))
    return flat


def prob_of(view: v2.Compose, kind: type) -> float:
    """Probability the view applies a transform of ``kind`` (0 when absent)."""
    found = [p for t, p in ops(view) if isinstance(t, kind)]
    assert len(found) <= 1
    return found[0] if found else 0.0


def test_views_sizes_and_order():
    pipe = AUGMENTATIONS.build("multicrop", image_size=32, local_size=12, num_local=5)
    assert isinstance(pipe, ViewPipeline)
    assert pipe.num_views == 7 and pipe.view_sizes == [32, 32] + [12] * 5
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    views = pipe(image)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 12, 12)] * 5
    assert all(v.dtype == torch.float32 for v in views)
    crops = [ops(v)[0][0] for v in pipe.transforms]
    assert [c.scale for c in crops] == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 5


def test_paper_probabilities_per_view():
    pipe = AUGMENTATIONS.build("multicrop", image_size=64, local_size=24, num_local=2, preset="imagenet")
    g1, g2, loc = pipe.transforms[0], pipe.transforms[1], pipe.transforms[2]
    assert [prob_of(v, v2.GaussianBlur) for v in (g1, g2, loc)] == [1.0, 0.1, 0.5]
    assert [prob_of(v, v2.RandomSolarize) for v in (g1, g2, loc)] == [0.0, 0.2, 0.0]
    for v in (g1, g2, loc):
        assert prob_of(v, v2.RandomHorizontalFlip) == 0.5
        assert prob_of(v, v2.ColorJitter) == 0.8
        assert prob_of(v, v2.RandomGrayscale) == 0.2
        jitter = next(t for t, _ in ops(v) if isinstance(t, v2.ColorJitter))
        assert jitter.brightness == (0.6, 1.4) and jitter.saturation == (0.8, 1.2) and jitter.hue == (-0.1, 0.1)


def test_small_preset_turns_blur_off_and_overrides_win():
    pipe = AUGMENTATIONS.build("multicrop", image_size=28, local_size=12, num_local=2, preset="small")
    assert all(prob_of(v, v2.GaussianBlur) == 0.0 for v in pipe.transforms)
    assert prob_of(pipe.transforms[1], v2.RandomSolarize) == 0.2
    pipe = AUGMENTATIONS.build("multicrop", image_size=28, local_size=12, num_local=1, preset="small",
                               local_blur_p=0.3, solarize_p=0.0)
    assert [prob_of(v, v2.GaussianBlur) for v in pipe.transforms] == [0.0, 0.0, 0.3]
    assert all(prob_of(v, v2.RandomSolarize) == 0.0 for v in pipe.transforms)


def test_solarisation_fires_on_second_global_crop_only():
    # No crop change on a constant bright image: only solarisation (255 -> 0) can darken it.
    pipe = AUGMENTATIONS.build("multicrop", image_size=16, local_size=8, num_local=2, preset="small",
                               solarize_p=1.0, jitter_p=0.0, gray_p=0.0)
    image = torch.full((3, 16, 16), 250, dtype=torch.uint8)
    g1, g2, l1, _ = pipe(image)
    assert g2.mean() < g1.mean() and torch.allclose(g1, l1[..., :1, :1].expand_as(g1))


def test_zero_local_crops_and_errors():
    assert AUGMENTATIONS.build("multicrop", image_size=32, num_local=0).view_sizes == [32, 32]
    with pytest.raises(ValueError, match="preset"):
        AUGMENTATIONS.build("multicrop", preset="tiny")
    with pytest.raises(ValueError, match="local_scale"):
        AUGMENTATIONS.build("multicrop", local_scale=[0.5, 0.1])


def test_recipe_schema_from_factory():
    cfg = resolve({"objective": {"name": "dino"},
                   "augment": {"name": "multicrop", "image_size": 28, "local_size": 12, "num_local": 4,
                               "global_scale": [0.3, 1.0]}})
    assert cfg.augment.global_scale == [0.3, 1.0] and cfg.augment.local_scale == [0.05, 0.4]
    with pytest.raises(ConfigError, match="num_local"):
        resolve({"objective": {"name": "dino"}, "augment": {"name": "multicrop", "num_local": "many"}})
    with pytest.raises(ConfigError, match="multicrop"):
        resolve({"objective": {"name": "simclr"}, "augment": {"name": "multicrop"}})
