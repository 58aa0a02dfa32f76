"""``segmentation_folder``: a user's images with per-pixel label maps, for the segmentation probe.

Layout (``root/<split>/`` is used when it exists, ``val`` also serving ``test``; else ``root`` itself)::

    root/[split/]images/street_01.jpg     any PIL-readable image
    root/[split/]masks/street_01.png      a single-channel PNG (mode L or P) of class indices, same size
    root/classes.txt                      optional: one class name per line, line k names value k

Every image needs a mask of the same stem; a pixel equal to ``ignore_index`` (default 255) is left out of training
and scoring. Items are ``(uint8 image (3, H, W), -1)`` like an unlabelled image folder; ``mask(i)`` is the
``(H, W)`` uint8 label map. ``fmnist_scenes`` (:mod:`sslkit.data.scenes`) offers the same ``mask(i)``.

Example::

    ds = DATASETS.build("segmentation_folder", split="train", root="~/data/streets")
    image, _ = ds[0]; ds.mask(0).shape == image.shape[1:]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sslkit.data.base import DataError, ImageDataset
from sslkit.data.image_folder import IMAGE_EXTENSIONS, decode_image
from sslkit.registry import DATASETS

DEFAULT_IGNORE_INDEX = 255
MASK_MODES = ("L", "P")  # 8-bit class indices; RGB colour-coded masks are refused (their colours are not classes)


def read_mask(path: Path) -> torch.Tensor:
    """A PNG label map -> ``(H, W)`` uint8 class indices. Palette PNGs give their indices, not their colours."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im, dtype=np.uint8) if mode in MASK_MODES else None
    except Exception as e:  # noqa: BLE001 - any decoder failure: truncated, not an image, too large
        raise DataError(f"cannot read mask {path}: {e}. Masks are single-channel PNG label maps.") from None
    if arr is None:
        raise DataError(f"mask {path} has PIL mode {mode!r}; save masks as single-channel PNGs (mode L or P) whose "
                        "pixel values are class indices (0, 1, 2, ...; the ignore index for unlabelled pixels).")
    return torch.from_numpy(arr.copy())


class SegmentationFolderDataset(ImageDataset):
    """Images decoded on access, each with the label map of the same stem (``mask(i)``)."""

    def __init__(self, images: list[Path], masks: list[Path], classes: list[str], ignore_index: int,
                 source: str) -> None:
        self.files, self.mask_files, self.classes = images, masks, classes
        self.ignore_index, self.source = ignore_index, source

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> torch.Tensor:
        return torch.full((len(self.files),), -1, dtype=torch.long)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            return decode_image(self.files[i]), -1
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
            raise DataError(f"cannot read image {self.files[i]}: {e}. Fix or remove it and its mask.") from None

    def mask(self, i: int) -> torch.Tensor:
        """``(H, W)`` uint8 label map of item ``i``; its size is checked against the image's."""
        m = read_mask(self.mask_files[i])
        from PIL import Image

        with Image.open(self.files[i]) as im:
            w, h = im.size
        if tuple(m.shape) != (h, w):
            raise DataError(f"mask {self.mask_files[i]} is {m.shape[1]}x{m.shape[0]} but its image {self.files[i]} "
                            f"is {w}x{h}; a mask must have its image's size.")
        return m


@DATASETS.register("segmentation_folder", help="root/[split/]images/*.jpg + masks/*.png label maps (ignore 255)")
def segmentation_folder(split: str = "train", root: str | None = None,
                        ignore_index: int = DEFAULT_IGNORE_INDEX) -> SegmentationFolderDataset:
    """Images in ``images/`` and PNG label maps of the same stem in ``masks/`` (see the module docstring)."""
    if root is None:
        raise DataError("segmentation_folder needs a root: the folder holding images/ and masks/ "
                        "(or train/ and test/ with those inside).")
    r = Path(root).expanduser()
    base = r
    for name in ([split] + (["val"] if split == "test" else [])):
        if (r / name / "images").is_dir():
            base = r / name
            break
    img_dir, mask_dir = base / "images", base / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise DataError(f"segmentation_folder: {base} needs an images/ and a masks/ folder (masks: PNG label maps "
                        "with the image's file stem).")
    if not 0 <= int(ignore_index) <= 255:
        raise DataError(f"segmentation_folder ignore_index must be in 0..255 (masks are 8-bit), got {ignore_index}")
    images = sorted(p for p in img_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"segmentation_folder: no images ({', '.join(IMAGE_EXTENSIONS)}) in {img_dir}.")
    masks = [mask_dir / f"{p.stem}.png" for p in images]
    missing = [str(m) for m in masks if not m.is_file()]
    if missing:
        raise DataError(f"segmentation_folder: {len(missing)} image(s) have no mask, e.g. {missing[:3]}; every "
                        "images/NAME.ext needs masks/NAME.png.")
    names = r / "classes.txt"
    classes = [ln.strip() for ln in names.read_text(encoding="utf-8").splitlines() if ln.strip()] \
        if names.is_file() else []
    return SegmentationFolderDataset(images, masks, classes, int(ignore_index), f"segmentation_folder/{split} ({base})")
