"""fmnist_scenes: masks match the pasted items pixel for pixel, determinism, splits and registration."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslkit.data.fashion_mnist import _FILES, candidate_dirs, fashion_mnist
from sslkit.data.scenes import ALPHA_GAIN, ALPHA_THRESHOLD, SHADE, compose_scene, resize_items
from sslkit.plugins import load_all
from sslkit.registry import DATASETS

load_all()


def _fmnist_installed() -> bool:
    stems = [stem for pair in _FILES.values() for stem in pair]
    return any(all((d / s).is_file() or (d / (s + ".gz")).is_file() for s in stems) for d in candidate_dirs(None))


needs_fmnist = pytest.mark.skipif(not _fmnist_installed(),
                                  reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


def _reference(bg, inten, classes, positions, tints):
    """Independent reconstruction: the image by sequential blending in float64, and the mask as
    'class + 1 of the top-most item whose alpha exceeds the threshold at that pixel, else 0'."""
    img = bg.astype(np.float64)
    _, h, w = bg.shape
    alphas = np.zeros((len(inten), h, w))  # each item's alpha on the full canvas (0 outside it)
    for k, (v, (y, x), tint) in enumerate(zip(inten, positions, tints)):
        v = v.astype(np.float64)
        a = np.minimum(ALPHA_GAIN * v, 1.0)
        fg = np.asarray(tint, np.float64)[:, None, None] * (SHADE + (1 - SHADE) * v)
        sl = (slice(None), slice(y, y + v.shape[0]), slice(x, x + v.shape[1]))
        img[sl] = a * fg + (1 - a) * img[sl]
        alphas[k][sl[1:]] = a
    mask = np.zeros((h, w), np.uint8)
    for yy in range(h):
        for xx in range(w):
            for k in reversed(range(len(inten))):
                if alphas[k, yy, xx] > ALPHA_THRESHOLD:
                    mask[yy, xx] = classes[k] + 1
                    break
    return img, mask, alphas


def test_compose_scene_mask_matches_items_pixel_for_pixel():
    rng = np.random.default_rng(0)
    bg = rng.integers(0, 120, (3, 40, 48), dtype=np.uint8)
    yy, xx = np.mgrid[0:14, 0:12]
    a = (np.clip((xx + yy) * 14, 0, 255)).astype(np.uint8)  # ramp: faint corner below the threshold
    b = np.zeros((10, 16), np.uint8)
    b[2:8, 1:15] = 200
    b[4:6, 4:12] = 10  # a faint hole: the item below must show through in the mask
    c = rng.integers(0, 256, (28, 28), dtype=np.uint8)  # resized to 17 px
    items, classes = [a, b, c], [3, 7, 0]
    positions, sizes = [(5, 6), (9, 8), (20, 28)], [None, None, 17]
    tints = [(255, 40, 40), (40, 255, 40), (200, 200, 255)]
    img, mask = compose_scene(bg, items, classes, positions, sizes, tints)
    assert img.dtype == np.uint8 and img.shape == bg.shape and mask.dtype == np.uint8 and mask.shape == (40, 48)

    inten = [a / 255.0, b / 255.0, resize_items(c[None], 17)[0]]
    ref_img, ref_mask, alphas = _reference(bg, inten, classes, positions, tints)
    np.testing.assert_array_equal(mask, ref_mask)
    assert np.abs(img.astype(np.float64) - ref_img).max() <= 1.0
    # the scene exercises what it should: occlusion, see-through below the threshold, background, all classes
    assert ((alphas[0] > ALPHA_THRESHOLD) & (alphas[1] > ALPHA_THRESHOLD)).any()  # b occludes a
    see_through = (alphas[0] > ALPHA_THRESHOLD) & (alphas[1] > 0) & (alphas[1] <= ALPHA_THRESHOLD)
    assert see_through.any() and (mask[see_through] == 4).all()
    faint_a = (alphas[0] > 0) & (alphas[0] <= ALPHA_THRESHOLD) & (alphas[1:].sum(0) == 0)
    assert faint_a.any() and (mask[faint_a] == 0).all()
    assert set(np.unique(mask)) == {0, 1, 4, 8}
    outside = alphas.sum(0) == 0
    np.testing.assert_array_equal(img[:, outside], bg[:, outside])
    with pytest.raises(ValueError, match="does not fit"):
        compose_scene(bg, [c], [0], [(30, 0)], [17])


def test_resize_items_is_antialiased_bilinear():
    x = np.random.default_rng(1).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    for side in (9, 19, 28, 38):
        ref = F.interpolate(torch.from_numpy(x).float()[:, None] / 255, size=(side, side), mode="bilinear",
                            antialias=True, align_corners=False)[:, 0].clamp(0, 1).numpy()
        np.testing.assert_allclose(resize_items(x, side), ref, atol=1e-5)


@needs_fmnist
def test_registered_and_every_canvas_has_its_objects():
    ds = DATASETS.build("fmnist_scenes", split="train", num_images=64)
    assert len(ds) == 64 and hasattr(ds, "images")  # in memory, for the batched augmentation backend
    img, label = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 64, 64) and isinstance(label, int)
    assert ds.images.shape == (64, 3, 64, 64) and ds.images.dtype == torch.uint8
    assert ds.masks.shape == (64, 64, 64) and ds.masks.dtype == torch.uint8
    assert ds.mask(5).shape == (64, 64) and torch.equal(ds.mask(5), ds.masks[5])
    assert len(ds.classes) == 11 and ds.classes[0] == "background" and ds.classes[1] == "T-shirt/top"
    assert int(ds.masks.max()) <= 10
    present = ds.item_indices >= 0
    assert ((present.sum(1) >= 1) & (present.sum(1) <= 4)).all()
    assert ((ds.num_objects >= 1) & (ds.num_objects <= 4)).all()
    for i in range(len(ds)):
        values = set(torch.unique(ds.masks[i]).tolist()) - {0}
        assert values and values <= {c + 1 for c in ds.item_classes[i][present[i]].tolist()}
        assert int(ds.item_areas[i].sum()) == int((ds.masks[i] > 0).sum())
        largest = int(ds.item_areas[i].argmax())
        assert ds.labels[i] == ds.item_classes[i, largest] + 1 and int(ds.labels[i]) in values


@needs_fmnist
def test_deterministic_by_seed():
    a = DATASETS.build("fmnist_scenes", split="test", num_images=32, seed=3)
    b = DATASETS.build("fmnist_scenes", split="test", num_images=32, seed=3)
    c = DATASETS.build("fmnist_scenes", split="test", num_images=32, seed=4)
    for name in ("images", "masks", "labels", "item_indices", "item_positions"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.images, c.images) and not torch.equal(a.masks, c.masks)
    assert not torch.equal(a.item_indices, c.item_indices)


@needs_fmnist
def test_train_and_test_canvases_come_from_their_own_split():
    sources = {split: fashion_mnist(split) for split in ("train", "test")}
    built = {split: DATASETS.build("fmnist_scenes", split=split, num_images=24, seed=0) for split in sources}
    assert not torch.equal(built["train"].images, built["test"].images)
    for split, other in (("train", "test"), ("test", "train")):
        ds, src = built[split], sources[split]
        assert ds.split == split
        present = ds.item_indices >= 0
        assert int(ds.item_indices.max()) < len(src)
        assert torch.equal(ds.item_classes[present], src.labels[ds.item_indices[present]])
        other_matches = 0
        for i in range(len(ds)):
            k = int(present[i].sum()) - 1  # the top-most item is never occluded
            j, side = int(ds.item_indices[i, k]), int(ds.item_sizes[i, k])
            y, x = ds.item_positions[i, k].tolist()
            window = ds.masks[i, y:y + side, x:x + side].numpy()
            cls = int(ds.item_classes[i, k]) + 1
            v = resize_items(src.images[j:j + 1, 0], side)[0]
            on = np.minimum(ALPHA_GAIN * v, 1) > ALPHA_THRESHOLD
            assert on.any() and (window[on] == cls).all()
            opaque = ALPHA_GAIN * v >= 1  # there the pixel is the item's own colour, whatever lies below
            colour = ds.item_tints[i, k].numpy()[:, None] * (SHADE + (1 - SHADE) * v[opaque])
            got = ds.images[i, :, y:y + side, x:x + side].numpy()[:, opaque].astype(np.float64)
            assert np.abs(got - colour).max() <= 1.0
            jo = j % len(sources[other])
            v_other = resize_items(sources[other].images[jo:jo + 1, 0], side)[0]
            other_matches += bool((window[np.minimum(ALPHA_GAIN * v_other, 1) > ALPHA_THRESHOLD] == cls).all())
        assert other_matches <= len(ds) // 4  # the other split does not explain the canvas
