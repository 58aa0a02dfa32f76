"""Multi-crop views (Caron et al. 2020, SwAV; the DINO paper's recipe, Caron et al. 2021, appendix / main_dino.py).

Two global crops (``image_size``, scale (0.4, 1)) then ``num_local`` local crops (``local_size``, scale
(0.05, 0.4)). Every view gets a horizontal flip (p=0.5), colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8 and
grayscale with p=0.2. The views differ in blur and solarisation, which makes the two global crops asymmetric:

    ====================  ===========  ==========
    view                  blur p       solarise p
    ====================  ===========  ==========
    global 1              1.0          0
    global 2              0.1          0.2
    each local            0.5          0
    ====================  ===========  ==========

Example::

    pipe = AUGMENTATIONS.build("multicrop", image_size=224, local_size=96, num_local=10)
    views = pipe(uint8_image)          # [2 x (3, 224, 224), 10 x (3, 96, 96)]
"""

from __future__ import annotations

from torchvision.transforms import InterpolationMode, v2

from sslkit.augment.base import ViewPipeline, gaussian_blur, solarize, to_float
from sslkit.registry import AUGMENTATIONS

NUM_GLOBAL = 2  # the global crops come first; DINO's teacher sees exactly these
# Blur probabilities (global 1, global 2, locals). At 28-32 px the blur kernel (10% of the side) is 3 px
# and sigma up to 2 erases most detail, so the "small" preset turns blur off.
PRESETS = {
    "imagenet": {"global1_blur_p": 1.0, "global2_blur_p": 0.1, "local_blur_p": 0.5},
    "small": {"global1_blur_p": 0.0, "global2_blur_p": 0.0, "local_blur_p": 0.0},
}


def _crop_view(size: int, scale: list[float], flip_p: float, jitter: list[float], jitter_p: float, gray_p: float,
               blur_p: float, solarize_p: float) -> v2.Compose:
    """One view's transform: resized crop -> flip -> colour jitter -> grayscale -> [blur] -> [solarise] -> float."""
    brightness, contrast, saturation, hue = jitter
    ops: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(flip_p),
        v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_p),
        v2.RandomGrayscale(gray_p),
    ]
    if blur_p > 0:
        ops.append(gaussian_blur(size, blur_p))
    if solarize_p > 0:
        ops.append(solarize(solarize_p))
    return v2.Compose([*ops, *to_float()])


def _check_scale(name: str, scale: list[float]) -> None:
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"multicrop {name} must be [lo, hi] with 0 < lo <= hi <= 1, got {list(scale)}")


@AUGMENTATIONS.register("multicrop", help="2 global + N local crops with DINO's asymmetric blur/solarisation")
def multicrop(image_size: int = 224, local_size: int = 96, num_local: int = 10, preset: str = "imagenet",
              global_scale: list[float] = (0.4, 1.0), local_scale: list[float] = (0.05, 0.4),
              flip_p: float = 0.5, jitter: list[float] = (0.4, 0.4, 0.2, 0.1), jitter_p: float = 0.8,
              gray_p: float = 0.2, global1_blur_p: float | None = None, global2_blur_p: float | None = None,
              local_blur_p: float | None = None, solarize_p: float = 0.2) -> ViewPipeline:
    """Multi-crop views: ``[global 1, global 2, local 1, ..., local num_local]``.

    Args:
        image_size: global crop side (also the evaluation resolution).
        local_size: local crop side (96 at 224; about 0.4 x image_size for small images).
        num_local: number of local crops (paper: 10 at ImageNet scale; 0 gives the 2-crop variant).
        preset: "imagenet" (the paper's blur probabilities) or "small" (no blur, for 28-32 px images).
        global_scale / local_scale: RandomResizedCrop area ranges. Official advice: with few local crops a
            wider global range such as (0.25, 1) or (0.14, 1) works better.
        flip_p, jitter (brightness, contrast, saturation, hue), jitter_p, gray_p: shared by all views.
        global1_blur_p, global2_blur_p, local_blur_p: override the preset's blur probabilities.
        solarize_p: solarisation probability of the second global crop only.

    Returns:
        A :class:`ViewPipeline` with ``view_sizes = [image_size] * 2 + [local_size] * num_local``.
    """
    if preset not in PRESETS:
        raise ValueError(f"multicrop preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if image_size <= 0 or local_size <= 0 or num_local < 0:
        raise ValueError(f"multicrop needs image_size, local_size > 0 and num_local >= 0, got "
                         f"{image_size}, {local_size}, {num_local}")
    _check_scale("global_scale", global_scale)
    _check_scale("local_scale", local_scale)
    if len(jitter) != 4:
        raise ValueError(f"multicrop jitter is [brightness, contrast, saturation, hue], got {list(jitter)}")
    blur = dict(PRESETS[preset])
    for key, value in (("global1_blur_p", global1_blur_p), ("global2_blur_p", global2_blur_p),
                       ("local_blur_p", local_blur_p)):
        if value is not None:
            blur[key] = value
    shared = {"flip_p": flip_p, "jitter": list(jitter), "jitter_p": jitter_p, "gray_p": gray_p}
    global1 = _crop_view(image_size, list(global_scale), **shared, blur_p=blur["global1_blur_p"], solarize_p=0.0)
    global2 = _crop_view(image_size, list(global_scale), **shared, blur_p=blur["global2_blur_p"], solarize_p=solarize_p)
    local = _crop_view(local_size, list(local_scale), **shared, blur_p=blur["local_blur_p"], solarize_p=0.0)
    transforms = [global1, global2] + [local] * num_local
    return ViewPipeline(transforms, [image_size] * NUM_GLOBAL + [local_size] * num_local)
