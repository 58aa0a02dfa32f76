"""Plant known near-duplicates in a set of images on disk: the ground truth for the dedup demo and benchmark.

Five kinds, each a copy of a distinct source image:

* ``exact``: the same file content under another name;
* ``resized``: scaled by a factor in [0.5, 0.8] or [1.25, 2] (bilinear), saved as PNG;
* ``jpeg``: re-encoded as JPEG at quality 20-60;
* ``crop``: a box of 50-90% of the area (aspect 3/4 to 4/3) at a random place, saved at its own size;
* ``colour``: tinted with a random RGB colour, brightness, contrast and gamma changed, saved as PNG.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np

KINDS = ("exact", "resized", "jpeg", "crop", "colour")
SCALE_RANGES = ((0.5, 0.8), (1.25, 2.0))
JPEG_QUALITY = (20, 60)
CROP_AREA = (0.5, 0.9)
CROP_ASPECT = (0.75, 4 / 3)
TINT = (0.4, 1.0)  # per-channel multiplier of a tint
CONTRAST = (0.7, 1.3)
BRIGHTNESS = (-30, 30)
GAMMA = (0.7, 1.4)


def save_png(array: np.ndarray, path: Path) -> None:
    """Save an ``(H, W)`` or ``(H, W, 3)`` uint8 array as PNG."""
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG")


def write_images(images: np.ndarray, folder: Path, prefix: str = "img") -> list[Path]:
    """Save ``(N, H, W[, 3])`` uint8 images as ``folder/<prefix>_<i>.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        p = folder / f"{prefix}_{i:06d}.png"
        save_png(im, p)
        paths.append(p)
    return paths


def make_copy(kind: str, src: Path, dst_stem: Path, rng: np.random.Generator) -> Path:
    """Write a ``kind`` copy of image ``src`` next to ``dst_stem`` (suffix chosen here); returns its path."""
    from PIL import Image

    if kind == "exact":
        dst = dst_stem.with_suffix(src.suffix)
        shutil.copyfile(src, dst)
        return dst
    with Image.open(src) as im:
        im = im.convert("RGB")
    w, h = im.size
    if kind == "resized":
        lo, hi = SCALE_RANGES[int(rng.integers(2))]
        f = rng.uniform(lo, hi)
        out = im.resize((max(4, round(w * f)), max(4, round(h * f))), Image.BILINEAR)
    elif kind == "jpeg":
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(*JPEG_QUALITY)))
        dst = dst_stem.with_suffix(".jpg")
        dst.write_bytes(buf.getvalue())
        return dst
    elif kind == "crop":
        area = rng.uniform(*CROP_AREA) * w * h
        aspect = np.exp(rng.uniform(np.log(CROP_ASPECT[0]), np.log(CROP_ASPECT[1])))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out = im.crop((x, y, x + cw, y + ch))
    elif kind == "colour":
        a = np.asarray(im, dtype=np.float32)
        a = a * rng.uniform(*TINT, size=3)
        a = (a - a.mean()) * rng.uniform(*CONTRAST) + a.mean() + rng.uniform(*BRIGHTNESS)
        a = 255.0 * (np.clip(a, 0, 255) / 255.0) ** rng.uniform(*GAMMA)
        out = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
    else:
        raise ValueError(f"unknown duplicate kind {kind!r}; one of {KINDS}")
    dst = dst_stem.with_suffix(".png")
    out.save(dst, format="PNG")
    return dst


def plant_duplicates(sources: list[Path], folder: Path, per_kind: int, seed: int = 0,
                     kinds: tuple[str, ...] = KINDS) -> list[dict[str, str]]:
    """Write ``per_kind`` copies of each kind into ``folder``, each of a different source.

    Returns one record per copy: ``{"copy": path, "source": path, "kind": kind}``.
    """
    rng = np.random.default_rng(seed)
    if per_kind * len(kinds) > len(sources):
        raise ValueError(f"{per_kind} copies of {len(kinds)} kinds need that many sources, got {len(sources)}")
    folder.mkdir(parents=True, exist_ok=True)
    picks = rng.choice(len(sources), size=per_kind * len(kinds), replace=False)
    truth = []
    for n, s in enumerate(picks):
        kind = kinds[n // per_kind]
        dst = make_copy(kind, sources[s], folder / f"dup_{kind}_{n:05d}", rng)
        truth.append({"copy": str(dst.resolve()), "source": str(sources[s].resolve()), "kind": kind})
    return truth
