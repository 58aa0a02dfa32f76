"""Batched, on-device view augmentation: per-sample random parameters applied with a few batched tensor ops.

The per-image backend (:class:`sslkit.augment.base.ViewPipeline`, torchvision ``v2`` transforms) augments one
image at a time on the CPU. This backend takes a whole uint8 batch ``(B, 3, H, W)`` on any device and makes every
view there, with the same random transforms, drawn independently per sample:

============  ==========================================================================================
step          batched implementation
============  ==========================================================================================
resized crop  :func:`sample_resized_crop_params` (torchvision's ``RandomResizedCrop.get_params``,
              vectorised), then ONE ``grid_sample`` call per output size for all views and samples
flip          folded into the crop's sampling grid (the column coordinates run backwards)
colour        :func:`color_jitter`: brightness, contrast, saturation, hue with per-sample factors and a
              per-sample random order, as ``v2.ColorJitter``
grayscale     :func:`apply_grayscale` (ITU-R 601-2 luma, torchvision's weights)
blur          :func:`gaussian_blur`: separable, per-sample sigma, one grouped convolution per direction
solarise      :func:`solarize`
normalise     per-view mean and std, output float32
============  ==========================================================================================

The recipes themselves live with the per-image factories (SimCLR: Chen et al. 2020, appendix A; multi-crop:
Caron et al. 2020/2021; MAE: He et al. 2022, A.1). :func:`batched_pipeline` builds the per-image pipeline with
the same keyword arguments and translates its torchvision transforms into :class:`ViewSpec` s, so both backends
always share one definition of each recipe.

Differences from the per-image backend (distributions and ops match; values differ slightly):

* The per-image backend works on uint8 and rounds after every op; this one stays in floating point.
* Antialiasing (``antialias=True``, used by all recipes when a crop is shrunk) is approximated: each output
  pixel averages up to :data:`MAX_SUPERSAMPLE` x :data:`MAX_SUPERSAMPLE` bilinear/bicubic samples spread to match
  the width of torchvision's antialias filter (see :func:`antialias_width`). When no crop can be larger than
  the output (e.g. 32 px images to 32 px views), nothing is supersampled and bilinear crops match torchvision
  to float precision. Supersampling k x k times makes the sampling grid and the sampled crops k^2 times the
  size of the views (k = 3 for 96 px local crops of 224 px images).
* Bicubic taps near a crop's edge read the image pixels just outside the crop (torchvision crops first and
  repeats the edge pixels instead); bilinear and nearest crops match torchvision exactly.
* Randomness comes from one CPU ``torch.Generator`` per batch rather than the global RNG per image.
* A batch is one tensor, so its images share one size (the per-image backend takes any size per image).

Example::

    pipe = batched_pipeline("simclr", image_size=32)
    g = torch.Generator().manual_seed(0)
    views = pipe(uint8_images.cuda(), generator=g)     # [2 x (B, 3, 32, 32) float32 on the GPU]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode, v2

from sslkit.augment.base import IMAGENET_MEAN, IMAGENET_STD, ViewPipeline
from sslkit.registry import AUGMENTATIONS

UINT8_MAX = 255.0
CROP_TRIES = 10  # attempts before the central-crop fallback (torchvision RandomResizedCrop.get_params)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect-ratio range
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, rounded as torchvision rounds it
# Supersampling cap per axis for the antialias approximation: memory of the sampled grid grows with its square.
MAX_SUPERSAMPLE = 4
# Sampling grids of low-precision dtypes cannot address pixels (bf16 resolves ~1/256 of the image width), so
# crops (and the hue rotation, whose wrap-arounds amplify rounding) run in at least float32 and are cast back.
GRID_DTYPE = torch.float32
INTERPOLATIONS = {InterpolationMode.BILINEAR: "bilinear", InterpolationMode.BICUBIC: "bicubic",
                  InterpolationMode.NEAREST: "nearest"}

# Colour-jitter ops are numbered as v2.ColorJitter numbers them (its randperm(4) indexes this order).
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
NUM_JITTER_OPS = len(JITTER_OPS)
NEUTRAL_FACTORS = (1.0, 1.0, 1.0, 0.0)  # factors that leave an image unchanged, per op id
# hsv -> rgb: channel c is v - chroma * clamp(min(k, 4 - k), 0, 1) with k = (offset_c + 6 * hue) mod 6.
HUE_SECTORS = 6.0
HUE_CHANNEL_OFFSETS = (5.0, 3.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Random parameters
# ----------------------------------------------------------------------------------------------------------------

def _central_crop_fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """(h, w) of torchvision's fallback: the largest central crop whose aspect ratio is inside ``ratio``."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def sample_resized_crop_params(batch_size: int, height: int, width: int, scale: Sequence[float] = (0.08, 1.0),
                               ratio: Sequence[float] = DEFAULT_RATIO,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """Vectorised ``torchvision.transforms.v2.RandomResizedCrop`` parameters, one crop per sample.

    Per sample, as torchvision: up to :data:`CROP_TRIES` tries of an area fraction uniform in ``scale`` and an
    aspect ratio log-uniform in ``ratio``, sides rounded half to even; the first try that fits in the image wins
    and is placed uniformly at random. If none fits, the central crop with the nearest allowed aspect ratio.
    All tries are drawn at once, so the RNG stream differs from torchvision's while the distribution is the same.

    Args:
        batch_size: number of crops B.
        height, width: image size.
        scale: (lo, hi) range of the crop area as a fraction of the image area.
        ratio: (lo, hi) range of the crop aspect ratio width / height.
        generator: CPU generator for all draws (None: the global one).

    Returns:
        int64 (B, 4) on the CPU: ``[top, left, crop_height, crop_width]``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    u = torch.rand(2, batch_size, CROP_TRIES, generator=generator, dtype=torch.float64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])  # (B, T)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])  # (B, T)
    w = torch.round(torch.sqrt(target_area * aspect))  # round half to even, like Python's round
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (B, T)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting try, (B, 1)
    found = fits.any(dim=1)  # (B,)
    fallback_h, fallback_w = _central_crop_fallback(height, width, (min(ratio), max(ratio)))
    h = torch.where(found, h.gather(1, first).squeeze(1), float(fallback_h))
    w = torch.where(found, w.gather(1, first).squeeze(1), float(fallback_w))
    # Uniform integer offsets in [0, side - crop]: floor(u * count) with u in [0, 1).
    u_pos = torch.rand(2, batch_size, generator=generator, dtype=torch.float64)
    top = torch.minimum(torch.floor(u_pos[0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u_pos[1] * (width - w + 1)), width - w)
    top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1).long()  # (B, 4)


def _uniform(n: int, bounds: Sequence[float], generator: torch.Generator | None) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def _bernoulli(n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def _to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Copy small host parameters to the images' device without a synchronisation.

    A plain host-to-CUDA copy waits for the stream to drain; from pinned memory it is asynchronous (PyTorch's
    pinned-memory cache keeps the host buffer alive until the copy has run).
    """
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, dtype, non_blocking=True)
    return t.to(device, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Resized crop (+ flip) through one grid_sample call
# ----------------------------------------------------------------------------------------------------------------

def antialias_width(ratio: torch.Tensor) -> torch.Tensor:
    """Width, in source pixels, over which an output pixel's supersamples are spread when shrinking by ``ratio``.

    torchvision's antialiased bilinear resize filters with a triangle of half-width ``ratio`` (variance
    ratio^2 / 6). Averaging the bilinear interpolant (a triangle of half-width 1, variance 1/6) over a box of
    width ``w`` has variance w^2 / 12 + 1/6; equal variances give ``w = sqrt(2 (ratio^2 - 1))``: 0 when not
    shrinking (plain bilinear, as torchvision), and continuous in ``ratio``.
    """
    return torch.sqrt(2.0 * (ratio * ratio - 1.0).clamp_min(0.0))


def _supersample_factor(in_size: int, out_size: int, mode: str, antialias: bool) -> int:
    """Samples per output pixel along one axis: enough to space them <= 1 source pixel apart for the largest
    possible crop (the whole side), capped at :data:`MAX_SUPERSAMPLE`. Depends on shapes only, so a sample's
    view does not depend on the other crops of the batch."""
    if not antialias or mode == "nearest" or in_size <= out_size:
        return 1
    width = float(antialias_width(torch.tensor(in_size / out_size, dtype=torch.float64)))
    return max(1, min(MAX_SUPERSAMPLE, math.ceil(width)))


def _source_positions(start: torch.Tensor, length: torch.Tensor, out_size: int, mode: str,
                      supersample: int) -> torch.Tensor:
    """Source pixel coordinates (index space, pixel centres at integers) that one axis of a crop samples.

    ``start``, ``length``: (V, B) float crop offset and side. Returns (V, B, out_size * supersample).
    Follows ``torch.nn.functional.interpolate`` with ``align_corners=False`` on the cropped image: bilinear
    samples at ``(i + 0.5) * length / out - 0.5``, clamped into the crop (which is how interpolate treats the
    crop's border); nearest takes ``floor(i * length / out)`` with a float32 scale like interpolate's.
    """
    index = torch.arange(out_size, device=start.device, dtype=start.dtype)  # (out,)
    scale = (length / out_size).unsqueeze(-1)  # (V, B, 1)
    if mode == "nearest":
        offset = torch.minimum(torch.floor(index * scale), length.unsqueeze(-1) - 1)
        return start.unsqueeze(-1) + offset  # (V, B, out)
    centres = start.unsqueeze(-1) + (index + 0.5) * scale - 0.5  # (V, B, out)
    if supersample > 1:
        sub = (torch.arange(supersample, device=start.device, dtype=start.dtype) + 0.5) / supersample - 0.5  # (k,)
        spread = antialias_width(scale).unsqueeze(-1)  # (V, B, 1, 1)
        centres = (centres.unsqueeze(-1) + sub * spread).flatten(-2)  # (V, B, out * k)
    if mode == "bilinear":
        centres = torch.clamp(centres, start.unsqueeze(-1), (start + length - 1).unsqueeze(-1))
    return centres


def _to_grid(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel index -> grid_sample's normalised coordinate for ``align_corners=False`` (-1, 1 = outer edges)."""
    return (2.0 * positions + 1.0) / size - 1.0


def _interpolation_name(interpolation: str | InterpolationMode) -> str:
    if isinstance(interpolation, InterpolationMode):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"batched crops support {sorted(INTERPOLATIONS.values())}, got {interpolation}")
        return INTERPOLATIONS[interpolation]
    if interpolation not in INTERPOLATIONS.values():
        raise ValueError(f"batched crops support {sorted(INTERPOLATIONS.values())}, got {interpolation!r}")
    return interpolation


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int | Sequence[int],
                  flip: torch.Tensor | None = None, interpolation: str | InterpolationMode = "bilinear",
                  antialias: bool = False) -> torch.Tensor:
    """V crops of every image, resized to ``size``, in one ``grid_sample`` call.

    The V crops of an image are stacked along the sampling grid's height, so the source batch is read as it is,
    never repeated. A horizontal flip reverses the grid's column coordinates. Equivalent to
    ``v2.functional.resized_crop(image, top, left, h, w, size, interpolation, antialias)`` followed by
    ``horizontal_flip`` where ``flip``; see the module docstring for the exact differences.

    Args:
        images: float (B, C, H, W), values in any range.
        boxes: (V, B, 4) ``[top, left, height, width]`` in pixels (integers, as RandomResizedCrop draws them).
        size: output side, or (height, width).
        flip: optional bool (V, B): flip that crop horizontally.
        interpolation: "bilinear", "bicubic" or "nearest" (or the InterpolationMode).
        antialias: approximate torchvision's antialiased shrinking by supersampling (bilinear and bicubic).

    Returns:
        (V, B, C, out_h, out_w) in ``images.dtype``.
    """
    mode = _interpolation_name(interpolation)
    out_h, out_w = _pair(size)
    num_views, batch, _ = boxes.shape
    _, channels, height, width = images.shape
    if batch != images.shape[0]:
        raise ValueError(f"boxes are for {batch} images, the batch has {images.shape[0]}")
    k_h = _supersample_factor(height, out_h, mode, antialias)
    k_w = _supersample_factor(width, out_w, mode, antialias)
    boxes = _to_device(boxes, images.device, GRID_DTYPE)
    top, left, crop_h, crop_w = boxes.unbind(-1)  # each (V, B)
    rows = _to_grid(_source_positions(top, crop_h, out_h, mode, k_h), height)  # (V, B, out_h * k_h)
    cols = _to_grid(_source_positions(left, crop_w, out_w, mode, k_w), width)  # (V, B, out_w * k_w)
    if flip is not None:
        cols = torch.where(_to_device(flip, images.device).unsqueeze(-1), cols.flip(-1), cols)
    grid_shape = (batch, num_views, out_h * k_h, out_w * k_w)
    grid = torch.stack([cols.transpose(0, 1).unsqueeze(2).expand(grid_shape),  # x varies along the columns
                        rows.transpose(0, 1).unsqueeze(3).expand(grid_shape)], dim=-1)  # (B, V, h*k, w*k, 2)
    grid = grid.reshape(batch, num_views * out_h * k_h, out_w * k_w, 2)
    source = images.to(GRID_DTYPE) if images.dtype.itemsize < GRID_DTYPE.itemsize else images
    out = F.grid_sample(source, grid.to(source.dtype), mode=mode, padding_mode="border",
                        align_corners=False)  # (B, C, V * out_h * k_h, out_w * k_w)
    if k_h > 1 or k_w > 1:
        out = F.avg_pool2d(out, (k_h, k_w))  # (B, C, V * out_h, out_w)
    out = out.view(batch, channels, num_views, out_h, out_w).permute(2, 0, 1, 3, 4)  # (V, B, C, out_h, out_w)
    return out.to(images.dtype)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int | Sequence[int],
                 flip: torch.Tensor | None = None, interpolation: str | InterpolationMode = "bilinear",
                 antialias: bool = False) -> torch.Tensor:
    """One crop per image: float (B, C, H, W), boxes (B, 4) ``[top, left, h, w]``, flip (B,) -> (B, C, s, s).

    The single-view case of :func:`resized_crops` (same arguments and semantics).
    """
    flips = None if flip is None else flip.unsqueeze(0)
    return resized_crops(images, boxes.unsqueeze(0), size, flips, interpolation, antialias)[0]


# ----------------------------------------------------------------------------------------------------------------
# Colour ops: x is float (N, 3, H, W) with values in [0, 1]; factors are (N,) tensors, one per sample
# ----------------------------------------------------------------------------------------------------------------

def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1) in x's dtype and device, to broadcast over an image batch."""
    return _to_device(values, x.device, x.dtype).view(-1, 1, 1, 1)


def _blend(image: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * image + (1 - factor) * other``, clamped to [0, 1] (torchvision's ``_blend`` for floats)."""
    return (image * factor).add_(other * (1.0 - factor)).clamp_(0.0, 1.0)


def rgb_to_grayscale(x: torch.Tensor, num_output_channels: int = 1) -> torch.Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` (torchvision's ``rgb_to_grayscale``): (N, 3, H, W) -> (N, c, H, W)."""
    r, g, b = x.unbind(dim=-3)
    luma = (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(-3)
    return luma.expand_as(x) if num_output_channels == 3 else luma


def adjust_brightness(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Scale by a per-sample factor and clamp (torchvision ``adjust_brightness``)."""
    return (x * _per_sample(factors, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend with the sample's mean luma (torchvision ``adjust_contrast``)."""
    mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)  # (N, 1, 1, 1)
    return _blend(x, mean, _per_sample(factors, x))


def adjust_saturation(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend with the luma image (torchvision ``adjust_saturation``)."""
    return _blend(x, rgb_to_grayscale(x), _per_sample(factors, x))


def _fraction(t: torch.Tensor) -> torch.Tensor:
    """``t mod 1`` (floor-based: much faster than ``remainder`` on the CPU)."""
    return t - torch.floor(t)


def _rgb_to_hue_chroma_value(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HSV hue in [0, 1), chroma (max - min) and value (max), each (N, 1, H, W).

    The hue sector comes from the largest channel, red winning ties over green over blue (torchvision's rule);
    grey pixels get hue 0.
    """
    r, g, b = x.split(1, dim=-3)
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    # Hue in sixths of a turn, times chroma: red sector (g - b), green 2 + (b - r), blue 4 + (r - g).
    scaled_hue = torch.where(value == r, g - b,
                             torch.where(value == g, (b - r).add_(chroma, alpha=2.0), (r - g).add_(chroma, alpha=4.0)))
    divisor = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    return _fraction(scaled_hue.div_(divisor).div_(HUE_SECTORS)), chroma, value


def _hue_chroma_value_to_rgb(hue: torch.Tensor, chroma: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rgb_to_hue_chroma_value`, all channels at once: (N, 1, H, W) x 3 -> (N, 3, H, W)."""
    offsets = torch.tensor(HUE_CHANNEL_OFFSETS, device=hue.device, dtype=hue.dtype).view(1, 3, 1, 1)
    k = _fraction((hue * HUE_SECTORS + offsets).div_(HUE_SECTORS)).mul_(HUE_SECTORS)  # (N, 3, H, W) in [0, 6)
    return value - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by a per-sample fraction of a turn in [-0.5, 0.5] (torchvision ``adjust_hue``).

    16-bit inputs are converted in float32: the hue's divisions and wrap-arounds would cost bf16 ~0.05.
    """
    work = x.to(GRID_DTYPE) if x.dtype.itemsize < GRID_DTYPE.itemsize else x
    hue, chroma, value = _rgb_to_hue_chroma_value(work)
    hue = _fraction(hue + _per_sample(factors, work))
    return _hue_chroma_value_to_rgb(hue, chroma, value).to(x.dtype)


JITTER_FUNCTIONS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _update_rows_(x: torch.Tensor, rows: torch.Tensor,
                  fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """In place: ``x[rows] = fn(x[rows], index)``, computing ``fn`` on the selected samples only.

    ``rows`` is a bool (N,) mask read on the host (keep it on the CPU, as the pipeline does, and no device
    synchronisation happens); ``index`` is the (n,) int64 index of the selected rows on x's device.
    """
    index = rows.cpu().nonzero().squeeze(1)  # host-side selection: no device sync for CPU masks
    if index.numel() == 0:
        return x
    index = _to_device(index, x.device)
    if index.numel() == x.shape[0]:
        return x.copy_(fn(x, index))
    return x.index_copy_(0, index, fn(x.index_select(0, index), index))


def _update_rows(x: torch.Tensor, rows: torch.Tensor | None,
                 fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Out-of-place :func:`_update_rows_`; ``rows=None`` selects every sample."""
    if rows is None:
        return fn(x, torch.arange(x.shape[0], device=x.device))
    return _update_rows_(x.clone(), rows, fn)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``v2.ColorJitter`` with per-sample factors and a per-sample order of the four ops.

    At stage ``s`` each sample gets the op ``order[:, s]``. The samples an op changes at a stage are gathered on
    the host side, so every op runs once per sample that needs it (not on the whole batch at every stage) and
    no device synchronisation happens when ``factors`` and ``order`` are on the CPU, as the pipeline passes them.
    A neutral factor (1, 1, 1, 0) skips the op, for that sample: torchvision's op would leave it unchanged too,
    and an op whose range is None (absent from the jitter) always has the neutral factor.

    Args:
        x: float (N, 3, H, W) in [0, 1].
        factors: (N, 4) brightness, contrast, saturation, hue factors (1, 1, 1, 0 leave a sample unchanged).
        order: int (N, 4), per sample a permutation of the op ids 0..3 (v2.ColorJitter's ``randperm(4)``).

    Returns:
        float (N, 3, H, W), a new tensor.
    """
    factors, order = factors.cpu(), order.cpu()
    changes = factors != torch.tensor(NEUTRAL_FACTORS, dtype=factors.dtype)  # (N, 4) ops that alter a sample
    device_factors = _to_device(factors, x.device)
    x = x.clone()
    for stage in range(NUM_JITTER_OPS):
        for op, fn in enumerate(JITTER_FUNCTIONS):
            rows = (order[:, stage] == op) & changes[:, op]
            _update_rows_(x, rows, lambda sub, index, op=op, fn=fn: fn(sub, device_factors[index, op]))
    return x


def apply_grayscale(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Replace the samples where ``apply`` (N,) is True by their 3-channel luma image (``v2.RandomGrayscale``)."""
    return _update_rows(x, apply, lambda sub, _: rgb_to_grayscale(sub, 3))


def gaussian_kernels(kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Normalised 1-D Gaussian taps ``exp(-t^2 / (2 sigma^2))`` at integer offsets t: (N,) sigma -> (N, k)."""
    if kernel_size % 2 == 0 or kernel_size <= 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, device=sigma.device, dtype=sigma.dtype)  # (k,)
    taps = torch.exp(-0.5 * (offsets / sigma.unsqueeze(-1)) ** 2)  # (N, k)
    return taps / taps.sum(dim=-1, keepdim=True)


def _blur_all(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur: float (N, C, H, W), sigma (N,) -> (N, C, H, W)."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    taps = gaussian_kernels(kernel_size, sigma.to(torch.promote_types(x.dtype, torch.float32)))  # (N, k)
    weight = taps.to(x.dtype).repeat_interleave(c, dim=0)  # (N * C, k)
    padded = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    out = F.conv2d(padded, weight.view(n * c, 1, 1, kernel_size), groups=n * c)  # along W: (1, N*C, H+2h, W)
    out = F.conv2d(out, weight.view(n * c, 1, kernel_size, 1), groups=n * c)  # along H: (1, N*C, H, W)
    return out.view(n, c, h, w)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor,
                  apply: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian blur with a per-sample sigma (``v2.functional.gaussian_blur`` with sigma_x = sigma_y).

    Reflect padding, then the separable kernel as two grouped convolutions (one group per sample and
    channel), so every sample has its own kernel in one call per direction.

    Args:
        x: float (N, C, H, W); H and W must exceed ``kernel_size // 2`` (reflect padding).
        kernel_size: odd side of the kernel, shared by the batch.
        sigma: (N,) positive standard deviations in pixels.
        apply: optional bool (N,), read on the host; only those samples are blurred, the others are returned
            unchanged.
    """
    sigma = _to_device(sigma, x.device)
    return _update_rows(x, apply, lambda sub, index: _blur_all(sub, kernel_size, sigma[index]))


def solarize(x: torch.Tensor, threshold: float | torch.Tensor, apply: torch.Tensor | None = None) -> torch.Tensor:
    """Invert values ``>= threshold`` (torchvision ``solarize`` for floats: ``1 - x``).

    Args:
        x: float (N, C, H, W) in [0, 1].
        threshold: in [0, 1] (a uint8 threshold t is t / 255), or one per sample (N,).
        apply: optional bool (N,), read on the host; samples where False are returned unchanged.
    """
    thresholds = _to_device(threshold, x.device) if isinstance(threshold, torch.Tensor) else None

    def invert(sub: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        t = threshold if thresholds is None else _per_sample(thresholds[index], sub)
        return torch.where(sub >= t, 1.0 - sub, sub)

    return _update_rows(x, apply, invert)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample ``(x - mean) / std`` with mean and std (N, C)."""
    mean = _to_device(mean, x.device, x.dtype)[..., None, None]
    std = _to_device(std, x.device, x.dtype)[..., None, None]
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# Views: what a view does (ViewSpec), its random draws (ViewParams), and the pipeline
# ----------------------------------------------------------------------------------------------------------------

Range = tuple[float, float]


@dataclass(frozen=True)
class ViewSpec:
    """The random transform of one view: resized crop -> flip -> colour jitter -> grayscale -> blur -> solarise
    -> normalise, the order of SimCLR's appendix A and DINO's ``DataAugmentationDINO``.

    Probabilities are per sample. ``jitter`` holds the brightness, contrast, saturation and hue ranges of
    ``v2.ColorJitter`` (None: that op is absent). ``solarize_threshold`` is on the [0, 1] scale.
    """

    size: int
    scale: Range = (0.08, 1.0)
    ratio: Range = DEFAULT_RATIO
    interpolation: str = "bilinear"
    antialias: bool = True
    flip_p: float = 0.0
    jitter: tuple[Range | None, Range | None, Range | None, Range | None] = (None, None, None, None)
    jitter_p: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_kernel: int = 3
    blur_sigma: Range = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 128 / UINT8_MAX
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def has_jitter(self) -> bool:
        return self.jitter_p > 0 and any(r is not None for r in self.jitter)

    def sample(self, batch_size: int, height: int, width: int,
               generator: torch.Generator | None = None) -> ViewParams:
        """Draw this view's parameters for B images of size (height, width), on the CPU."""
        boxes = sample_resized_crop_params(batch_size, height, width, self.scale, self.ratio, generator)
        flip = _bernoulli(batch_size, self.flip_p, generator)
        jittered = _bernoulli(batch_size, self.jitter_p, generator)
        factors = torch.tensor(NEUTRAL_FACTORS, dtype=torch.float64).repeat(batch_size, 1)  # (B, 4)
        for op, bounds in enumerate(self.jitter):
            if bounds is not None:
                factors[:, op] = torch.where(jittered, _uniform(batch_size, bounds, generator), factors[:, op])
        order = torch.rand(batch_size, NUM_JITTER_OPS, generator=generator).argsort(dim=1)  # random permutations
        gray = _bernoulli(batch_size, self.gray_p, generator)
        blur = _bernoulli(batch_size, self.blur_p, generator)
        sigma = _uniform(batch_size, self.blur_sigma, generator)
        solar = _bernoulli(batch_size, self.solarize_p, generator)
        return ViewParams(boxes, flip, factors, order, gray, blur, sigma, solar)


@dataclass
class ViewParams:
    """Per-sample random parameters of N view rows (one view of B images, or several views stacked)."""

    boxes: torch.Tensor  # (N, 4) int64 [top, left, h, w]
    flip: torch.Tensor  # (N,) bool
    factors: torch.Tensor  # (N, 4) brightness, contrast, saturation, hue (neutral where not jittered)
    order: torch.Tensor  # (N, 4) int64 permutation of the jitter ops
    gray: torch.Tensor  # (N,) bool
    blur: torch.Tensor  # (N,) bool
    sigma: torch.Tensor  # (N,) float64 blur sigma (used where blur)
    solarize: torch.Tensor  # (N,) bool

    @staticmethod
    def cat(params: Sequence[ViewParams]) -> ViewParams:
        return ViewParams(*(torch.cat([getattr(p, f.name) for p in params]) for f in fields(ViewParams)))


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")


def _group_key(spec: ViewSpec) -> tuple:
    """Views with equal keys share one grid_sample call and one blur kernel size."""
    return spec.size, spec.interpolation, spec.antialias, spec.blur_kernel


class BatchedPipeline:
    """Batched twin of a per-image :class:`ViewPipeline`: uint8 (B, 3, H, W) on any device -> V float32 views.

    Views are grouped by output size (and interpolation, antialiasing and blur kernel): each group is one
    ``grid_sample`` call, then each colour op runs once over the group's rows (views x samples) that it changes.
    Parameters are drawn and kept on the CPU; only small index and factor tensors travel to the device, through
    pinned memory, so a CUDA batch is augmented without a host-device synchronisation.

    Args:
        specs: one :class:`ViewSpec` per view, in output order.
        dtype: float dtype of the colour ops (float32; bfloat16/float16 save memory on GPUs). Crops are sampled
            in float32 and the views are returned as float32 either way.
    """

    def __init__(self, specs: Sequence[ViewSpec], dtype: torch.dtype = torch.float32) -> None:
        if not specs:
            raise ValueError("a batched pipeline needs at least one view")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a float dtype, got {dtype}")
        self.specs = list(specs)
        self.dtype = dtype
        self.view_sizes = [s.size for s in self.specs]
        groups: dict[tuple, list[int]] = {}
        for index, spec in enumerate(self.specs):
            groups.setdefault(_group_key(spec), []).append(index)
        self.groups = list(groups.values())  # view indices per group, first-appearance order

    @property
    def num_views(self) -> int:
        return len(self.specs)

    @classmethod
    def from_view_pipeline(cls, pipeline: ViewPipeline, dtype: torch.dtype = torch.float32) -> BatchedPipeline:
        """Translate a per-image pipeline made of torchvision v2 transforms (see :func:`spec_from_transform`)."""
        specs = [spec_from_transform(t) for t in pipeline.transforms]
        for spec, size in zip(specs, pipeline.view_sizes):
            if spec.size != size:
                raise ValueError(f"view size {size} does not match its crop size {spec.size}")
        return cls(specs, dtype)

    def sample_params(self, batch_size: int, height: int, width: int,
                      generator: torch.Generator | None = None) -> list[ViewParams]:
        """Every view's random parameters for a batch, on the CPU (one :class:`ViewParams` per view)."""
        return [spec.sample(batch_size, height, width, generator) for spec in self.specs]

    def apply(self, images: torch.Tensor, params: Sequence[ViewParams]) -> list[torch.Tensor]:
        """Make the views with given parameters: uint8 (B, 3, H, W) -> V float32 (B, 3, s, s), normalised."""
        _check_images(images)
        if len(params) != self.num_views:
            raise ValueError(f"expected parameters for {self.num_views} views, got {len(params)}")
        batch = images.shape[0]
        source = images.to(GRID_DTYPE) / UINT8_MAX  # (B, 3, H, W) in [0, 1]
        views: list[torch.Tensor | None] = [None] * self.num_views
        for group in self.groups:
            out = self._apply_group(source, [self.specs[i] for i in group], [params[i] for i in group])
            for index, view in zip(group, out.split(batch)):
                views[index] = view
        return views  # type: ignore[return-value]

    def _apply_group(self, source: torch.Tensor, specs: list[ViewSpec], params: list[ViewParams]) -> torch.Tensor:
        """Views of one group, stacked view-major: float (B, 3, H, W) -> float32 (V * B, 3, s, s)."""
        first = specs[0]
        batch = source.shape[0]
        p = ViewParams.cat(params)  # CPU, (V * B, ...)
        boxes = p.boxes.view(len(specs), batch, 4)
        flip = p.flip.view(len(specs), batch)
        x = resized_crops(source, boxes, first.size, flip, first.interpolation, first.antialias)
        x = x.flatten(0, 1).to(self.dtype)  # (V * B, 3, s, s)
        if first.interpolation == "bicubic":
            x = x.clamp_(0.0, 1.0)  # cubic overshoot; the per-image backend saturates in uint8
        # The parameters stay on the CPU: the ops select rows on the host and copy only what they need.
        if any(s.has_jitter for s in specs):
            x = color_jitter(x, p.factors, p.order)
        if any(s.gray_p > 0 for s in specs):
            x = apply_grayscale(x, p.gray)
        if any(s.blur_p > 0 for s in specs):
            x = gaussian_blur(x, first.blur_kernel, p.sigma, p.blur)
        if any(s.solarize_p > 0 for s in specs):
            threshold = torch.cat([torch.full((batch,), s.solarize_threshold) for s in specs])
            x = solarize(x, threshold, p.solarize)
        mean = torch.tensor([s.mean for s in specs]).repeat_interleave(batch, dim=0)  # (V * B, 3)
        std = torch.tensor([s.std for s in specs]).repeat_interleave(batch, dim=0)
        return normalize(x, mean, std).float()

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """uint8 (B, 3, H, W) on any device -> V normalised float32 views (B, 3, s, s), in the per-image
        pipeline's view order. Parameters are drawn on the CPU from ``generator`` (a CPU generator; None: the
        global RNG), so a seeded generator reproduces the views on any device."""
        _check_images(images)
        batch, _, height, width = images.shape
        return self.apply(images, self.sample_params(batch, height, width, generator))

    def __repr__(self) -> str:
        return f"BatchedPipeline(num_views={self.num_views}, view_sizes={self.view_sizes}, dtype={self.dtype})"


# ----------------------------------------------------------------------------------------------------------------
# Translation from the per-image torchvision pipelines
# ----------------------------------------------------------------------------------------------------------------

# Stage of each translatable transform in the batched order; a pipeline must list them in this order.
_STAGES = (v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ColorJitter, v2.RandomGrayscale, v2.GaussianBlur,
           v2.RandomSolarize, v2.ToDtype, v2.Normalize)


def _flatten(transform: Callable, p: float = 1.0) -> list[tuple[Callable, float]]:
    """Compose trees -> [(transform, probability it is applied)]; RandomApply of one transform keeps its p."""
    if isinstance(transform, v2.Compose):
        return [item for t in transform.transforms for item in _flatten(t, p)]
    if isinstance(transform, v2.RandomApply):
        if len(transform.transforms) != 1:
            raise ValueError("the batched backend translates RandomApply of a single transform only")
        return _flatten(transform.transforms[0], p * transform.p)
    return [(transform, p)]


def spec_from_transform(transform: Callable) -> ViewSpec:
    """Read a per-image view transform (torchvision v2, applied to uint8 images) into a :class:`ViewSpec`.

    Supported, in this order: RandomResizedCrop, RandomHorizontalFlip, [RandomApply] ColorJitter,
    RandomGrayscale, [RandomApply] GaussianBlur, RandomSolarize, ToDtype(float32, scale=True), Normalize.
    Anything else raises ValueError naming it, rather than being silently skipped.
    """
    fields_: dict = {}
    last_stage = -1
    for t, p in _flatten(transform):
        stage = next((i for i, kind in enumerate(_STAGES) if isinstance(t, kind)), None)
        if stage is None:
            raise ValueError(f"the batched backend cannot translate {type(t).__name__}; supported: "
                             f"{[k.__name__ for k in _STAGES]}")
        if stage <= last_stage:
            raise ValueError(f"{type(t).__name__} is out of order or repeated; the batched order is "
                             f"{[k.__name__ for k in _STAGES]}")
        if p != 1.0 and not isinstance(t, (v2.ColorJitter, v2.GaussianBlur)):
            raise ValueError(f"the batched backend cannot apply {type(t).__name__} at random (RandomApply)")
        last_stage = stage
        fields_.update(_read_transform(t, p))
    if "size" not in fields_:
        raise ValueError("a batched view needs a RandomResizedCrop")
    if "mean" not in fields_ or last_stage != len(_STAGES) - 1:
        raise ValueError("a batched view must end with ToDtype(float32, scale=True) and Normalize")
    return ViewSpec(**fields_)


def _read_transform(t: Callable, p: float) -> dict:
    """The :class:`ViewSpec` fields set by one torchvision transform applied with probability p."""
    if isinstance(t, v2.RandomResizedCrop):
        height, width = t.size
        if height != width:
            raise ValueError(f"batched views are square, got crop size {t.size}")
        return {"size": height, "scale": tuple(t.scale), "ratio": tuple(t.ratio),
                "interpolation": _interpolation_name(t.interpolation), "antialias": bool(t.antialias)}
    if isinstance(t, v2.RandomHorizontalFlip):
        return {"flip_p": t.p}
    if isinstance(t, v2.ColorJitter):
        ranges = tuple(None if r is None else (float(r[0]), float(r[1]))
                       for r in (t.brightness, t.contrast, t.saturation, t.hue))
        return {"jitter": ranges, "jitter_p": p}
    if isinstance(t, v2.RandomGrayscale):
        return {"gray_p": t.p}
    if isinstance(t, v2.GaussianBlur):
        kx, ky = t.kernel_size
        if kx != ky:
            raise ValueError(f"batched blur needs a square kernel, got {t.kernel_size}")
        return {"blur_p": p, "blur_kernel": kx, "blur_sigma": (float(t.sigma[0]), float(t.sigma[1]))}
    if isinstance(t, v2.RandomSolarize):
        # It runs before ToDtype, on uint8 images: the threshold is on the 0..255 scale.
        return {"solarize_p": t.p, "solarize_threshold": float(t.threshold) / UINT8_MAX}
    if isinstance(t, v2.ToDtype):
        if t.dtype != torch.float32 or not t.scale:
            raise ValueError(f"batched views convert with ToDtype(float32, scale=True), got {t.dtype}, {t.scale}")
        return {}
    if isinstance(t, v2.Normalize):
        return {"mean": tuple(float(m) for m in t.mean), "std": tuple(float(s) for s in t.std)}
    raise AssertionError(f"unhandled transform {type(t).__name__}")  # _STAGES and this function disagree


def batched_pipeline(name: str, **kwargs) -> BatchedPipeline:
    """The batched twin of the registered per-image pipeline ``name``, from the SAME keyword arguments.

    The per-image factory is built first (so arguments are validated, and defaults and presets resolved, in one
    place) and its torchvision transforms are translated into :class:`ViewSpec` s.

    Args:
        name: a registered per-image pipeline made of the transforms :func:`spec_from_transform` reads (simclr,
            multicrop, mae, and a plug-in's own if it uses them); any other transform raises ValueError naming it.
        **kwargs: the recipe's ``augment`` section without ``name``.

    Example::

        pipe = batched_pipeline("multicrop", image_size=32, local_size=16, num_local=4, preset="small")
        views = pipe(images, generator=torch.Generator().manual_seed(0))   # 2 x (B,3,32,32), 4 x (B,3,16,16)
    """
    return BatchedPipeline.from_view_pipeline(AUGMENTATIONS.build(name, **kwargs))
