"""MAE's one-view pipeline (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", A.1).

Only a random resized crop and a horizontal flip: the masking is the augmentation. The paper found
colour jitter hurts (Table 1e) and that MAE works even with centre crops only.
"""

from __future__ import annotations

from torchvision.transforms import InterpolationMode, v2

from sslkit.augment.base import ViewPipeline, to_float
from sslkit.registry import AUGMENTATIONS

INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                  "nearest": InterpolationMode.NEAREST}


@AUGMENTATIONS.register("mae", help="1 view: resized crop (0.2,1) bicubic, horizontal flip, normalise")
def mae(image_size: int = 224, crop_scale: list[float] = (0.2, 1.0), flip_p: float = 0.5,
        interpolation: str = "bicubic") -> ViewPipeline:
    """One augmented view per image: uint8 (3, H, W) -> [float (3, image_size, image_size)], normalised.

    Args:
        image_size: output side; a multiple of the encoder's patch size.
        crop_scale: (lo, hi) area fraction of the random resized crop. Paper: (0.2, 1.0); with no
            cropping at all fine-tuning loses about 1% (Table 1e).
        flip_p: probability of a horizontal flip.
        interpolation: resize filter: "bicubic" (paper), "bilinear" or "nearest".

    Example:
        >>> pipe = mae(image_size=28)
        >>> [v.shape for v in pipe(torch.zeros(3, 28, 28, dtype=torch.uint8))]
        [torch.Size([3, 28, 28])]
    """
    if image_size <= 0:
        raise ValueError(f"mae image_size must be positive, got {image_size}")
    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"mae crop_scale must satisfy 0 < lo <= hi <= 1, got {list(crop_scale)}")
    if not 0 <= flip_p <= 1:
        raise ValueError(f"mae flip_p must be in [0, 1], got {flip_p}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"mae interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    view = v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(lo, hi), interpolation=INTERPOLATIONS[interpolation], antialias=True),
        v2.RandomHorizontalFlip(flip_p),
        *to_float(),
    ])
    return ViewPipeline([view], [image_size])
