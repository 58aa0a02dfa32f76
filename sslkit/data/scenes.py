"""``fmnist_scenes``: dense synthetic scenes of Fashion-MNIST items, with per-pixel class masks.

Each canvas (default 64x64 RGB) holds 1 to ``max_items`` Fashion-MNIST items, each resized (antialiased) to
``min_scale``..``max_scale`` of the canvas side, tinted with a random bright colour and pasted at a random
position over a background of smooth low-frequency colour noise, fine grain and clutter (short strokes and
small blobs that are *not* labelled). An item is pasted with its own intensity ``v`` (in [0, 1]) as alpha:
``pixel = a * tint * (SHADE + (1 - SHADE) * v) + (1 - a) * below`` with ``a = min(1, ALPHA_GAIN * v)``, and
its mask is where ``a > ALPHA_THRESHOLD``; later items occlude earlier ones in both the pixels and the mask.

Mask values: 0 = background, ``c + 1`` for Fashion-MNIST class ``c`` (so ``classes[v]`` names value ``v``).
The dataset item is ``(uint8 image (3, H, W), label)`` like every sslkit dataset, where ``label`` is the
mask value (1..10) of the *largest* item, i.e. the one with the most visible mask pixels after occlusion
(ties go to the earlier item). Masks are in ``dataset.masks`` (N, H, W) uint8 and ``dataset.mask(i)``.

Train canvases use Fashion-MNIST's train split and test canvases its test split; the source indices of
every item are recorded in ``dataset.item_indices``. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from sslkit.data.base import DataError, TensorImageDataset
from sslkit.data.fashion_mnist import CLASSES as FMNIST_CLASSES
from sslkit.data.fashion_mnist import fashion_mnist
from sslkit.registry import DATASETS

ALPHA_GAIN = 2.0  # alpha = min(1, ALPHA_GAIN * intensity / 255): dim garments stay visible over the background
ALPHA_THRESHOLD = 0.15  # an item pixel belongs to the item's mask where its alpha > this (intensity > ~19)
SCENE_CLASSES = ["background", *FMNIST_CLASSES]
DEFAULT_NUM_IMAGES = {"train": 10000, "test": 2000}
SHADE = 0.5  # pasted colour = tint * (SHADE + (1 - SHADE) * intensity / 255): keeps the garment's texture
_CHUNK = 1024  # canvases composed at once (bounds memory)


def _aa_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of antialiased bilinear resampling (a triangle filter widened by the downscale
    factor, as PIL and ``F.interpolate(..., antialias=True)`` use; equal to the latter within float error)."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    centre = (np.arange(out_size) + 0.5) * scale
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(in_size)[None] + 0.5 - centre[:, None]) / support)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def resize_items(items: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> np.ndarray:
    """Items ``(K, h, w)`` uint8 -> intensities ``(K, size, size)`` float32 in [0, 1].

    Antialiased bilinear (separable, two matrix products; no torch threads, which stall on a busy CPU). An
    item already at ``size`` is not resampled: its intensity is exactly ``item / 255``.
    """
    x = items.detach().cpu().numpy() if isinstance(items, torch.Tensor) else np.asarray(items)
    if x.ndim != 3:
        raise ValueError(f"resize_items expects (K, h, w) items, got shape {x.shape}")
    oh, ow = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    x = x.astype(np.float32) / 255.0
    if x.shape[1:] != (oh, ow):
        k, h, w = x.shape
        x = (x.reshape(k * h, w) @ _aa_weights(w, ow).T).reshape(k, h, ow)  # resample columns
        x = np.matmul(_aa_weights(h, oh), x)  # resample rows: (oh, h) @ (k, h, ow) -> (k, oh, ow)
    return np.clip(x, 0.0, 1.0, out=x)


def _paste(canvas: np.ndarray, mask: np.ndarray, inst: np.ndarray | None, idx: np.ndarray, inten: np.ndarray,
           tint: np.ndarray, cls: np.ndarray, ys: np.ndarray, xs: np.ndarray, slot: int, threshold: float) -> None:
    """Paste one item into each of the canvases ``idx`` (distinct), in place.

    canvas (N, 3, H, W) float32; mask / inst (N, H, W) uint8; inten (G, h, w) item intensities in [0, 1];
    tint (G, 3); cls (G,)
    Fashion-MNIST classes; ys, xs (G,) top-left corners; ``inst`` (if given) gets ``slot + 1``.
    """
    _, h, w = inten.shape
    alpha = np.minimum(ALPHA_GAIN * inten, 1.0)
    win = sliding_window_view(canvas, (h, w), axis=(2, 3), writeable=True)  # (N, 3, H-h+1, W-w+1, h, w)
    below = win[idx, :, ys, xs]  # (G, 3, h, w)
    a = alpha[:, None]
    fg = tint[:, :, None, None] * (SHADE + (1.0 - SHADE) * inten[:, None])
    win[idx, :, ys, xs] = a * fg + (1.0 - a) * below
    on = alpha > threshold
    mwin = sliding_window_view(mask, (h, w), axis=(1, 2), writeable=True)  # (N, H-h+1, W-w+1, h, w)
    mwin[idx, ys, xs] = np.where(on, (cls.astype(np.int64) + 1)[:, None, None], mwin[idx, ys, xs])
    if inst is not None:
        iwin = sliding_window_view(inst, (h, w), axis=(1, 2), writeable=True)
        iwin[idx, ys, xs] = np.where(on, slot + 1, iwin[idx, ys, xs])


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)  # round half up; x + 0.5 >= 0 after the clip


def compose_scene(background: np.ndarray, items: Sequence[np.ndarray], classes: Sequence[int],
                  positions: Sequence[tuple[int, int]], sizes: Sequence[int | None] | None = None,
                  tints: Sequence[Sequence[float]] | None = None,
                  threshold: float = ALPHA_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``items`` onto ``background`` in order (later ones on top); pure, the dataset's own code path.

    Args:
        background: uint8 (3, H, W).
        items: uint8 grayscale (h, w) arrays; alpha = min(1, ALPHA_GAIN * intensity / 255).
        classes: Fashion-MNIST class (0..9) of each item; its mask value is ``class + 1``.
        positions: top-left ``(y, x)`` of each item; the (resized) item must lie inside the canvas.
        sizes: side in px each item is resized to (antialiased); None (or a None entry) keeps its size.
        tints: RGB colour of each item (default white); pasted colour = tint * (SHADE + (1 - SHADE) * v).
        threshold: alpha above which a pixel belongs to the item's mask.

    Returns:
        ``(image uint8 (3, H, W), mask uint8 (H, W))`` with 0 = background.
    """
    bg = np.asarray(background)
    if bg.ndim != 3 or bg.shape[0] != 3:
        raise ValueError(f"background must be (3, H, W), got shape {bg.shape}")
    if not len(items) == len(classes) == len(positions):
        raise ValueError(f"got {len(items)} items, {len(classes)} classes and {len(positions)} positions")
    height, width = bg.shape[1:]
    canvas = bg.astype(np.float32)[None]
    mask = np.zeros((1, height, width), dtype=np.uint8)
    for k, item in enumerate(items):
        item = np.asarray(item)
        size = item.shape if sizes is None or sizes[k] is None else (int(sizes[k]), int(sizes[k]))
        y, x = (int(v) for v in positions[k])
        if y < 0 or x < 0 or y + size[0] > height or x + size[1] > width:
            raise ValueError(f"item {k} of size {size} at {(y, x)} does not fit a {height}x{width} canvas")
        tint = np.full(3, 255.0, np.float32) if tints is None else np.asarray(tints[k], np.float32)
        _paste(canvas, mask, None, np.zeros(1, np.int64), resize_items(item[None], size), tint[None],
               np.array([classes[k]]), np.array([y]), np.array([x]), k, threshold)
    return _to_uint8(canvas[0]), mask[0]


def _smooth_basis(s: int, grid: int) -> np.ndarray:
    """(s, grid) Gaussian bumps on a ``grid``-point lattice, rows summing to 1: smooth noise = B z B^T."""
    centres = (np.arange(grid) + 0.5) * s / grid
    b = np.exp(-0.5 * ((np.arange(s)[:, None] + 0.5 - centres[None]) / (0.7 * s / grid)) ** 2)
    return (b / b.sum(1, keepdims=True) * np.sqrt(grid)).astype(np.float32)  # keeps std roughly grid-free


def _backgrounds(rng: np.random.Generator, n: int, s: int) -> np.ndarray:
    """(n, 3, s, s) float32: dark base colour + smooth low/mid-frequency colour noise + fine grain."""
    out = rng.standard_normal((n, 1, s, s), dtype=np.float32)  # grain, shared by the channels
    out *= 4.0
    out = out + rng.uniform(10.0, 85.0, size=(n, 3, 1, 1)).astype(np.float32)
    for grid, amp in ((4, 16.0), (9, 7.0)):
        b = _smooth_basis(s, grid)
        z = rng.standard_normal((n * 3 * grid, grid), dtype=np.float32)
        t = (z @ (amp * b.T)).reshape(n, 3, grid, s)  # smooth along x (one matrix product)
        out += np.matmul(b, t)  # then along y
    return out


def _clutter(rng: np.random.Generator, canvas: np.ndarray, max_strokes: int = 5, max_blobs: int = 3) -> None:
    """Draw unlabelled clutter in place: 1..max_strokes short 2-px strokes and 0..max_blobs small blobs."""
    n, s = canvas.shape[0], canvas.shape[2]
    # strokes: T points along a segment, each stamped with a 2x2 brush
    t = np.linspace(0.0, 1.0, 12, dtype=np.float32)
    p0 = rng.uniform(0, s, size=(n, max_strokes, 1, 2))
    ang = rng.uniform(0, 2 * np.pi, size=(n, max_strokes, 1))
    length = rng.uniform(4.0, 0.28 * s, size=(n, max_strokes, 1))
    d = np.stack([np.sin(ang), np.cos(ang)], -1) * length[..., None]  # (n, S, 1, 2)
    pts = np.floor(p0 + t[None, None, :, None] * d).astype(np.int64)  # (n, S, T, 2)
    brush = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    pts = pts[:, :, :, None, :] + brush  # (n, S, T, 4, 2)
    on = np.arange(max_strokes) < rng.integers(1, max_strokes + 1, size=(n, 1))  # (n, S)
    col = rng.uniform(45.0, 165.0, size=(n, max_strokes, 3)).astype(np.float32)
    nn = np.broadcast_to(np.arange(n)[:, None, None, None], pts.shape[:-1])
    sel = np.broadcast_to(on[:, :, None, None], pts.shape[:-1])
    # blobs: discs of radius 1..2.5 px
    off = np.stack(np.mgrid[-3:4, -3:4], -1).reshape(-1, 2)  # (49, 2)
    rad = rng.uniform(1.0, 2.5, size=(n, max_blobs, 1))
    ctr = rng.integers(0, s, size=(n, max_blobs, 1, 2))
    bpts = ctr + off  # (n, B, 49, 2)
    bsel = (np.arange(max_blobs) < rng.integers(0, max_blobs + 1, size=(n, 1)))[:, :, None] & (
        (off**2).sum(-1) <= rad**2)
    bcol = rng.uniform(45.0, 165.0, size=(n, max_blobs, 3)).astype(np.float32)
    bnn = np.broadcast_to(np.arange(n)[:, None, None], bpts.shape[:-1])
    for ids, p, keep, c in ((nn, pts, sel, col[:, :, None, None]), (bnn, bpts, bsel, bcol[:, :, None])):
        c = np.broadcast_to(c, (*p.shape[:-1], 3))
        keep = keep & (p >= 0).all(-1) & (p < s).all(-1)
        canvas[ids[keep], :, p[..., 0][keep], p[..., 1][keep]] = c[keep]


def generate_scenes(src_images: np.ndarray, src_labels: np.ndarray, num_images: int, image_size: int = 64,
                    max_items: int = 4, min_scale: float = 0.3, max_scale: float = 0.6, seed: int = 0,
                    stream: int = 0, threshold: float = ALPHA_THRESHOLD) -> dict[str, np.ndarray]:
    """Compose ``num_images`` canvases from source items ``(M, h, w)`` uint8 with labels ``(M,)``.

    ``stream`` separates random streams (the dataset uses 0 for train, 1 for test). Returns numpy arrays:
    images (N, 3, S, S) uint8, masks (N, S, S) uint8, labels (N,) (mask value of the largest item) and per
    item (N, max_items[, ...]): item_indices (into the source, -1 = no item), item_classes (-1 = none),
    item_positions (y, x), item_sizes (px, 0 = none), item_tints (RGB), item_areas (visible mask pixels).
    """
    n, s, k_max = num_images, image_size, max_items
    rng = np.random.default_rng([seed, stream, 0])
    num_items = rng.integers(1, k_max + 1, size=n)
    present = np.arange(k_max)[None] < num_items[:, None]  # (N, K)
    idx = np.where(present, rng.integers(0, len(src_images), size=(n, k_max)), -1)
    sizes = np.clip(np.rint(rng.uniform(min_scale, max_scale, size=(n, k_max)) * s), 4, s).astype(np.int64)
    sizes = np.where(present, sizes, 0)
    pos = np.floor(rng.uniform(0.0, 1.0, size=(n, k_max, 2)) * (s - sizes + 1)[..., None]).astype(np.int64)
    hue = rng.uniform(0.25, 1.0, size=(n, k_max, 3))
    tints = (hue / hue.max(-1, keepdims=True) * rng.uniform(200.0, 255.0, size=(n, k_max, 1))).astype(np.float32)
    classes = np.where(present, np.asarray(src_labels)[np.maximum(idx, 0)], -1).astype(np.int64)

    # resize every item once, grouped by size: inten[side][row[i, k]] is item (i, k)'s intensity map
    row = np.zeros((n, k_max), dtype=np.int64)
    inten: dict[int, np.ndarray] = {}
    for side in np.unique(sizes[present]):
        at = sizes == side
        row[at] = np.arange(int(at.sum()))
        inten[int(side)] = resize_items(src_images[idx[at]], int(side))

    images = np.empty((n, 3, s, s), dtype=np.uint8)
    masks = np.empty((n, s, s), dtype=np.uint8)
    areas = np.zeros((n, k_max), dtype=np.int64)
    for c0 in range(0, n, _CHUNK):
        c1 = min(c0 + _CHUNK, n)
        crng = np.random.default_rng([seed, stream, 1, c0])
        canvas = _backgrounds(crng, c1 - c0, s)
        _clutter(crng, canvas)
        mask = np.zeros((c1 - c0, s, s), dtype=np.uint8)
        inst = np.zeros((c1 - c0, s, s), dtype=np.uint8)
        for k in range(k_max):
            for side, v in inten.items():
                g = np.nonzero(sizes[c0:c1, k] == side)[0]
                if len(g):
                    gi = c0 + g
                    _paste(canvas, mask, inst, g, v[row[gi, k]], tints[gi, k], classes[gi, k],
                           pos[gi, k, 0], pos[gi, k, 1], k, threshold)
        images[c0:c1] = _to_uint8(canvas)
        masks[c0:c1] = mask
        areas[c0:c1] = np.stack([(inst == k + 1).sum((1, 2)) for k in range(k_max)], 1)
    labels = classes[np.arange(n), areas.argmax(1)] + 1
    return {"images": images, "masks": masks, "labels": labels, "item_indices": idx, "item_classes": classes,
            "item_positions": pos, "item_sizes": sizes, "item_tints": tints, "item_areas": areas}


class SceneDataset(TensorImageDataset):
    """In-memory scenes: ``ds[i] -> (uint8 (3, H, W), label)`` plus ``masks`` (N, H, W) uint8 and metadata.

    ``classes`` is ``["background", *Fashion-MNIST classes]`` so that ``classes[v]`` names mask value ``v``;
    labels (the largest item's mask value) are in 1..10. Per-item metadata (N, max_items[, ...]) torch
    tensors: ``item_indices`` (index into the Fashion-MNIST ``split``, -1 = no item), ``item_classes``,
    ``item_positions`` (y, x), ``item_sizes``, ``item_tints``, ``item_areas`` (visible pixels).
    """

    def __init__(self, arrays: dict[str, np.ndarray], split: str, source: str) -> None:
        super().__init__(torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]),
                         list(SCENE_CLASSES), source)
        self.split = split
        self.masks = torch.from_numpy(arrays["masks"])
        for key in ("item_indices", "item_classes", "item_positions", "item_sizes", "item_tints", "item_areas"):
            setattr(self, key, torch.from_numpy(arrays[key]))

    def mask(self, i: int) -> torch.Tensor:
        """The class mask of canvas ``i``: (H, W) uint8, 0 = background, Fashion-MNIST class + 1 elsewhere."""
        return self.masks[i]

    @property
    def num_objects(self) -> torch.Tensor:
        """(N,) number of items with at least one visible mask pixel in each canvas."""
        return (self.item_areas > 0).sum(1)


@DATASETS.register("fmnist_scenes", help="64x64 scenes of 1-4 Fashion-MNIST items over clutter, with class masks")
def fmnist_scenes(split: str = "train", root: str | None = None, num_images: int | None = None,
                  image_size: int = 64, max_items: int = 4, min_scale: float = 0.3, max_scale: float = 0.6,
                  seed: int = 0) -> SceneDataset:
    """Scenes from Fashion-MNIST's ``split`` (found like ``fashion_mnist``: ``root``, then the Debian location).

    ``num_images`` defaults to 10000 (train) / 2000 (test); item sides are ``min_scale..max_scale`` of
    ``image_size``; label = mask value (class + 1) of the item with the most visible pixels.
    """
    if split not in DEFAULT_NUM_IMAGES:
        raise DataError(f"fmnist_scenes split must be 'train' or 'test', got {split!r}")
    n = DEFAULT_NUM_IMAGES[split] if num_images is None else int(num_images)
    if n < 1:
        raise DataError(f"fmnist_scenes num_images must be >= 1, got {num_images}; pass e.g. num_images=10000")
    if image_size < 16:
        raise DataError(f"fmnist_scenes image_size must be >= 16, got {image_size}; pass e.g. image_size=64")
    if not 1 <= max_items <= 255:
        raise DataError(f"fmnist_scenes max_items must be in 1..255, got {max_items}; pass e.g. max_items=4")
    if not 0 < min_scale <= max_scale <= 1:
        raise DataError(f"fmnist_scenes needs 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}; "
                        "pass e.g. min_scale=0.3 max_scale=0.6")
    try:
        src = fashion_mnist(split=split, root=root)
    except DataError as e:
        raise DataError(f"fmnist_scenes is built from Fashion-MNIST: {e}") from e
    arrays = generate_scenes(src._images[:, 0].numpy(), src.labels.numpy(), n, image_size, max_items,
                             min_scale, max_scale, seed, stream=0 if split == "train" else 1)
    return SceneDataset(arrays, split, f"fmnist_scenes/{split} (seed {seed}, from {src.source})")
