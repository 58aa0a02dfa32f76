"""ImageNet-style folder trees (``root/[split/]class/img.jpg``) and unlabeled folders of images.

Images are decoded on access (in the loader workers, per-image augmentation). With ``preload=True`` they are
decoded once into one uint8 tensor, so a folder of same-size small images (CIFAR or Fashion-MNIST written as PNG, a
curated list of them) trains with the batched augmentation of in-memory datasets instead of decoding every image
every epoch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from sslkit.data.base import DataError, ImageDataset, TensorImageDataset
from sslkit.registry import DATASETS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def decode_image(path: Path) -> torch.Tensor:
    """Decode any PIL-readable image to uint8 RGB ``(3, H, W)``.

    Grayscale, palette, CMYK, RGBA and 16-bit images are all converted; 16-bit data is scaled, not clipped.
    """
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            hi = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
            im = Image.fromarray(arr, mode="L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        rgb = im.convert("RGB")
        arr = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def unreadable(path: Path, e: Exception) -> DataError:
    """The error for an image that does not decode under ``strict``."""
    return DataError(f"cannot read image {path}: {e}. Remove or fix it, or set data.args.strict=false to skip "
                     "unreadable files.")


class ImageFolderDataset(ImageDataset):
    """Images decoded on access. Unreadable files are skipped (a warning names them) unless ``strict``."""

    def __init__(self, files: list[Path], labels: list[int], classes: list[str], strict: bool, source: str):
        self.files, self._labels, self.classes, self.strict, self.source = files, labels, classes, strict, source
        self.bad: list[str] = []
        self.bad_log: Path | None = None  # the engine points this at run_dir/bad_files.txt

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor(self._labels, dtype=torch.long)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        for attempt in range(min(len(self.files), 64)):
            j = (i + attempt) % len(self.files)
            try:
                return decode_image(self.files[j]), self._labels[j]
            except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
                if self.strict:
                    raise unreadable(self.files[j], e) from e
                if str(self.files[j]) not in self.bad:
                    self.bad.append(str(self.files[j]))
                    if self.bad_log is not None:  # one short line per append: safe from several workers
                        from sslkit.run import open_no_follow

                        with open_no_follow(self.bad_log) as f:
                            f.write(f"{self.files[j]}\n")
                    if len(self.bad) <= 5:
                        warnings.warn(f"skipping unreadable image {self.files[j]}: {e}", stacklevel=2)
        raise DataError(f"{self.source}: 64 unreadable images in a row from index {i}; first bad: {self.bad[:5]}")


def preload_dataset(ds: ImageFolderDataset, progress: bool = True) -> TensorImageDataset:
    """Decode every image of ``ds`` once into a :class:`TensorImageDataset` (one channel when all are gray).

    The images must share one size. Unreadable images are skipped (``strict``: raised) and listed in the result's
    ``skipped``; the engine copies them to the run's ``bad_files.txt``. Refuses a tensor larger than half the
    machine's memory.
    """
    import os

    from tqdm.auto import tqdm

    images: torch.Tensor | None = None
    keep: list[int] = []
    skipped: list[str] = []
    for i in tqdm(range(len(ds)), desc="preload", unit="img", disable=not progress, dynamic_ncols=True):
        try:
            img = decode_image(ds.files[i])
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
            if ds.strict:
                raise unreadable(ds.files[i], e) from e
            skipped.append(str(ds.files[i]))
            continue
        if images is None:
            need = len(ds) * img.numel()
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            if need > total / 2:
                raise DataError(f"{ds.source}: preloading {len(ds)} images of {img.shape[2]}x{img.shape[1]} needs "
                                f"{need / 1e9:.1f} GB, more than half of this machine's {total / 1e9:.1f} GB. Set "
                                "data.args.preload=false to decode images on access.")
            images = torch.empty((len(ds), *img.shape), dtype=torch.uint8)
            first = ds.files[i]
        elif img.shape != images.shape[1:]:
            raise DataError(f"{ds.source}: preload needs images of one size, but {first} is "
                            f"{images.shape[3]}x{images.shape[2]} and {ds.files[i]} is {img.shape[2]}x{img.shape[1]}. "
                            "Resize them to one size, or set data.args.preload=false to decode them on access.")
        images[len(keep)] = img
        keep.append(i)
    if images is None:
        raise DataError(f"{ds.source}: none of its {len(ds)} images could be read; first: {skipped[:3]}")
    if skipped:
        warnings.warn(f"{ds.source}: skipped {len(skipped)} unreadable image(s), e.g. {skipped[:3]}", stacklevel=2)
    images = images[:len(keep)]
    if bool((images[:, 0] == images[:, 1]).all() and (images[:, 0] == images[:, 2]).all()):
        images = images[:, :1].clone()
    labels = ds.labels[keep]
    out = TensorImageDataset(images, labels, ds.classes, f"{ds.source} (preloaded)")
    out.skipped = skipped  # type: ignore[attr-defined]
    return out


def _images_in(d: Path, recursive: bool) -> list[Path]:
    it = d.rglob("*") if recursive else d.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


@DATASETS.register("image_folder", help="ImageNet-style tree root/[train|val]/class/*.jpg, or an unlabeled folder")
def image_folder(split: str = "train", root: str | None = None, labeled: bool = True,
                 strict: bool = False, preload: bool = False) -> ImageDataset:
    """A folder tree. ``root/<split>`` is used when it exists (``val`` also serves ``test``), else ``root``.

    With ``labeled=True`` every sub-folder is a class; with ``labeled=False``, or when ``root`` holds images
    but no class folders, all images below it are used with label -1. ``preload``: see :func:`preload_dataset`.
    """
    if root is None:
        raise DataError("image_folder needs data.root, the folder that holds the images.")
    r = Path(root).expanduser()
    if not r.is_dir():
        raise DataError(f"image_folder root {r} does not exist or is not a folder.")
    base = r
    for name in ([split] + (["val"] if split == "test" else [])):
        if (r / name).is_dir():
            base = r / name
            break
    class_dirs = sorted(d for d in base.iterdir() if d.is_dir()) if labeled else []
    class_dirs = [d for d in class_dirs if _images_in(d, recursive=True)]
    if class_dirs:
        files, labels = [], []
        for k, d in enumerate(class_dirs):
            imgs = _images_in(d, recursive=True)
            files += imgs
            labels += [k] * len(imgs)
        classes = [d.name for d in class_dirs]
    else:
        files = _images_in(base, recursive=True)
        labels, classes = [-1] * len(files), []
    if not files:
        raise DataError(f"image_folder: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {base}.")
    ds = ImageFolderDataset(files, labels, classes, strict, f"image_folder/{split} ({base})")
    return preload_dataset(ds) if preload else ds
