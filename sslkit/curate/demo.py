"""``make curate-demo``: plant near-duplicates in Fashion-MNIST, deduplicate, then retrieve around a seed set.

1. dedup: ``--dedup-base`` Fashion-MNIST test images as PNG, plus ``--per-kind`` copies of each kind of
   :mod:`sslkit.curate.plant`; ``sslkit curate dedup`` on the folder.
2. retrieve: a seed set of ``--seed-per-class`` train images from each of ``--seed-classes``; a pool of the
   other train images (``--pool-size`` of them, all by default) mixed with ``--ood-ratio`` times as many
   out-of-domain images (``--ood``: procedural shapes from ``sslkit.data.synthetic``, grey crops of real photos,
   or half of each); ``sslkit curate retrieve``.

``python -m sslkit.curate.demo --out DIR``; benchmarks/curate_dedup.py scores the same folders.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sslkit.curate.plant import KINDS, plant_duplicates, write_images

SEED_CLASSES = (0, 1, 5, 7, 8)  # T-shirt/top, Trouser, Sandal, Sneaker, Bag
SEED_PER_CLASS = 100
OOD_PREFIX = "ood"
OOD_KINDS = ("shapes", "photos", "mixed")


def prepare_dedup(out: Path, base: int, per_kind: int, seed: int = 0, start: int = 0) -> list[dict[str, str]]:
    """``out/dedup/{base,dups}`` and ``out/dedup/truth.json`` from test images ``start .. start + base``; returns
    the planted records."""
    from sslkit.plugins import load_all
    from sslkit.registry import DATASETS

    load_all()
    ds = DATASETS.build("fashion_mnist", split="test")
    folder = out / "dedup"
    if start + base > len(ds):
        raise ValueError(f"images {start}..{start + base} asked for, the test split has {len(ds)}")
    paths = write_images(ds._images[start:start + base, 0].numpy(), folder / "base")
    truth = plant_duplicates(paths, folder / "dups", per_kind, seed=seed)
    (folder / "truth.json").write_text(json.dumps(truth))
    return truth


def photo_crops(n: int, size: int = 28, seed: int = 0, photos: tuple[str, ...] = ("china", "flower")) -> np.ndarray:
    """``(n, size, size)`` uint8 grey crops of real photos (:func:`sslkit.data.sample_photos.photo_files`; by
    default the two that scikit-learn ships): squares of 24-256 px at random places, flipped at random, resized
    with antialiasing. Natural textures and edges, in Fashion-MNIST's format but not its domain."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from sslkit.data.sample_photos import photo_files

    files = photo_files()
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    grey = [(torch.from_numpy(np.array(Image.open(files[name]).convert("RGB"))).permute(2, 0, 1).float()
             * weights).sum(0) for name in photos]
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        photo = grey[int(rng.integers(len(grey)))]
        h, w = photo.shape
        side = int(rng.integers(24, min(256, h, w) + 1))
        y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = F.interpolate(photo[None, None, y:y + side, x:x + side], size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False)[0, 0]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        out[i] = crop.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def ood_images(kind: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` 28-px out-of-domain images of ``kind`` (:data:`OOD_KINDS`), keyed by the pool folder they go to."""
    from sslkit.registry import DATASETS

    if kind not in OOD_KINDS:
        raise ValueError(f"unknown out-of-domain kind {kind!r}; choose one of {', '.join(OOD_KINDS)}")
    n_photos = {"shapes": 0, "photos": n, "mixed": n // 2}[kind]
    out = {}
    if n - n_photos:
        shapes = DATASETS.build("synthetic", num_samples=n - n_photos, image_size=28, seed=seed)
        out[OOD_PREFIX] = shapes.images.permute(0, 2, 3, 1).numpy()
    if n_photos:
        out[f"{OOD_PREFIX}_photo"] = photo_crops(n_photos, 28, seed)
    return out


def prepare_retrieval(out: Path, pool_size: int | None, seed_per_class: int = SEED_PER_CLASS,
                      classes: tuple[int, ...] = SEED_CLASSES, seed: int = 0, ood: str = "shapes",
                      ood_ratio: float = 1.0) -> dict[str, object]:
    """``out/retrieve/seed/<class>/*.png`` and ``out/retrieve/pool/{fmnist_<class>,ood,ood_photo}/*.png``: the
    pool holds ``ood_ratio`` out-of-domain images of kind ``ood`` per Fashion-MNIST image."""
    from sslkit.plugins import load_all
    from sslkit.registry import DATASETS

    load_all()
    if ood_ratio < 0:
        raise ValueError(f"ood_ratio must be >= 0, got {ood_ratio}")
    ds = DATASETS.build("fashion_mnist", split="train")
    labels = ds.labels.numpy()
    rng = np.random.default_rng(seed)
    seed_rows = np.concatenate([rng.choice(np.flatnonzero(labels == c), seed_per_class, replace=False)
                                for c in classes])
    rest = np.setdiff1d(np.arange(len(labels)), seed_rows)
    if pool_size is not None and pool_size < len(rest):
        rest = np.sort(rng.choice(rest, pool_size, replace=False))
    folder = out / "retrieve"
    images = ds._images[:, 0].numpy()
    for c in classes:
        rows = seed_rows[labels[seed_rows] == c]
        write_images(images[rows], folder / "seed" / f"class_{c}", prefix=f"seed{c}")
    for c in range(len(ds.classes)):
        rows = rest[labels[rest] == c]
        write_images(images[rows], folder / "pool" / f"fmnist_{c}", prefix=f"f{c}")
    n_ood = int(round(ood_ratio * len(rest)))
    for name, ims in ood_images(ood, n_ood, seed).items():
        write_images(ims, folder / "pool" / name, prefix=name)
    return {"seed_classes": list(classes), "pool_fmnist": int(len(rest)), "pool_ood": n_ood, "ood": ood,
            "base_rate": float(np.isin(labels[rest], classes).sum() / (len(rest) + n_ood))}


def pool_class(path: str) -> int:
    """Fashion-MNIST class of a demo pool image from its folder name; -1 for out-of-domain images."""
    name = Path(path).parent.name
    return int(name.split("_")[1]) if name.startswith("fmnist_") else -1


def main(argv: list[str] | None = None) -> int:
    from sslkit.cli import main as cli

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="curate_demo", help="folder for the images and the results")
    p.add_argument("--dedup-base", type=int, default=5000, help="Fashion-MNIST test images in the dedup set")
    p.add_argument("--per-kind", type=int, default=100, help="planted copies of each kind")
    p.add_argument("--pool-size", type=int, default=None,
                   help="Fashion-MNIST train images in the pool (default: all but the seed set)")
    p.add_argument("--ood", default="shapes", choices=OOD_KINDS,
                   help="out-of-domain pool images: procedural shapes, grey crops of real photos, or half of each")
    p.add_argument("--ood-ratio", type=float, default=1.0,
                   help="out-of-domain images per Fashion-MNIST pool image")
    p.add_argument("--mode", default="sample", help="retrieval mode: sample or cluster")
    args = p.parse_args(argv)
    out = Path(args.out)
    prepare_dedup(out, args.dedup_base, args.per_kind)
    if cli(["curate", "dedup", str(out / "dedup"), "--out", str(out / "dedup_out")]):
        return 1
    info = prepare_retrieval(out, args.pool_size, ood=args.ood, ood_ratio=args.ood_ratio)
    if cli(["curate", "retrieve", "--seed", str(out / "retrieve" / "seed"), "--pool", str(out / "retrieve" / "pool"),
            "--mode", args.mode, "--out", str(out / "retrieve_out")]):
        return 1
    got = [pool_class(x) for x in (out / "retrieve_out" / "curated.txt").read_text().split("\n") if x]
    share = float(np.isin(got, info["seed_classes"]).mean()) if got else 0.0
    print(f"retrieval precision: {share:.3f} of {len(got)} retrieved pool images are from the seed classes "
          f"(pool base rate {info['base_rate']:.3f}). Kinds planted: {', '.join(KINDS)}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
