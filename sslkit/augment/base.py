"""Building blocks shared by the per-image (torchvision) view pipelines."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ViewPipeline:
    """Per-image backend: one transform per view, applied to the same uint8 source image.

    Args:
        transforms: one callable per view, uint8 (3, H, W) -> float (3, s, s).
        view_sizes: the output side length of each view, in the same order.
    """

    def __init__(self, transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]], view_sizes: Sequence[int]):
        if len(transforms) != len(view_sizes):
            raise ValueError("one view size per transform")
        self.transforms = list(transforms)
        self.view_sizes = list(view_sizes)

    @property
    def num_views(self) -> int:
        return len(self.transforms)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]

    def __repr__(self) -> str:
        return f"ViewPipeline(num_views={self.num_views}, view_sizes={self.view_sizes})"


def to_float(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> list:
    """uint8 -> float in [0, 1] -> normalised."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def color_jitter(strength: float, p: float) -> v2.Transform:
    """SimCLR's colour distortion: brightness/contrast/saturation 0.8*s, hue 0.2*s, applied with prob p."""
    s = strength
    return v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.2 * s, 0.5))], p=p)


def gaussian_blur(image_size: int, p: float, sigma: tuple[float, float] = (0.1, 2.0)) -> v2.Transform:
    """Blur with a kernel of ~10% of the image side (odd), sigma uniform in ``sigma`` (SimCLR, DINO)."""
    k = max(3, int(0.1 * image_size) // 2 * 2 + 1)
    return v2.RandomApply([v2.GaussianBlur(kernel_size=k, sigma=sigma)], p=p)


def solarize(p: float) -> v2.Transform:
    return v2.RandomSolarize(threshold=128, p=p)


def eval_transform(image_size: int, crop_ratio: float | None = None,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """Deterministic evaluation view: resize the short side, centre-crop ``image_size``, normalise.

    ``crop_ratio`` defaults to 1.0 for small images (< 96 px) and 0.875 (the 256->224 convention) otherwise.
    """
    ratio = crop_ratio if crop_ratio is not None else (1.0 if image_size < 96 else 0.875)
    resize = int(round(image_size / ratio))
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), *to_float(mean, std)])
