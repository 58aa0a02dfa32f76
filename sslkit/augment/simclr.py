"""SimCLR's two-view pipeline (Chen et al. 2020, appendix A)."""

from __future__ import annotations

from torchvision.transforms import v2

from sslkit.augment.base import ViewPipeline, color_jitter, gaussian_blur, to_float
from sslkit.registry import AUGMENTATIONS

# Strength presets from the SimCLR paper: colour strength 0.5 and no blur for CIFAR-size images,
# strength 1.0 with blur (p=0.5) at ImageNet scale.
PRESETS = {"small": {"jitter_strength": 0.5, "blur_p": 0.0}, "imagenet": {"jitter_strength": 1.0, "blur_p": 0.5}}


@AUGMENTATIONS.register("simclr", help="2 views: resized crop (0.08,1), flip, colour jitter, grayscale, [blur]")
def simclr(image_size: int = 32, preset: str = "small", crop_scale: list[float] = (0.08, 1.0),
           jitter_strength: float | None = None, jitter_p: float = 0.8, gray_p: float = 0.2,
           blur_p: float | None = None, flip_p: float = 0.5, num_views: int = 2) -> ViewPipeline:
    """Two independently augmented views of each image.

    ``preset`` is "small" (32 px: jitter strength 0.5, no blur) or "imagenet" (strength 1.0, blur p=0.5);
    ``jitter_strength`` and ``blur_p`` override the preset.
    """
    if preset not in PRESETS:
        raise ValueError(f"simclr preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if image_size <= 0:
        raise ValueError(f"simclr image_size must be positive, got {image_size}")
    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"simclr crop_scale must satisfy 0 < lo <= hi <= 1, got {list(crop_scale)}")
    strength = PRESETS[preset]["jitter_strength"] if jitter_strength is None else jitter_strength
    blur = PRESETS[preset]["blur_p"] if blur_p is None else blur_p
    ops = [
        v2.RandomResizedCrop(image_size, scale=(lo, hi), antialias=True),
        v2.RandomHorizontalFlip(flip_p),
        color_jitter(strength, jitter_p),
        v2.RandomGrayscale(gray_p),
    ]
    if blur > 0:
        ops.append(gaussian_blur(image_size, blur))
    view = v2.Compose([*ops, *to_float()])
    return ViewPipeline([view] * num_views, [image_size] * num_views)
