"""Measured pictures of what a model sees: DINO's thresholded attention, DINOv2's PCA patch maps, and the Jaccard
index of such masks against object masks.

- :func:`mass_mask`: DINO's thresholded attention map (Caron et al. 2021, section 4.2.1 and fig. 3): the fewest
  patches that hold ``mass`` (60%) of the class token's attention.
- :func:`pca_patch_maps`: DINOv2's PCA visualisation (Oquab et al. 2023, fig. 1 and section 7.4): a first PCA over
  all patches of the images, whose first component thresholded separates foreground from background; a second PCA
  with 3 components fitted on the foreground patches only, each component min-max scaled to a colour channel.
- :func:`jaccard`: intersection over union of boolean masks, per image (the DINO paper's Table 5 measure);
  :func:`blob_mask`: the baseline of a fixed centred Gaussian blob of a given area.

All functions are pure tensor functions, so they are tested on hand-made maps and feature grids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DINO_MASS = 0.6  # the DINO paper keeps the patches holding 60% of the attention mass


def mass_mask(attention: torch.Tensor, mass: float = DINO_MASS) -> torch.Tensor:
    """The fewest patches whose attention adds up to ``mass`` of each map's total.

    Args:
        attention: (B, h, w) non-negative attention (e.g. the mean over heads of the class token's attention).
        mass: share of the total to keep, in (0, 1].

    Returns:
        (B, h, w) bool; ties at the threshold keep the patch with the lower index first.

    Example:
        >>> mass_mask(torch.tensor([[[0.5, 0.3], [0.15, 0.05]]]))   # 0.5 + 0.3 >= 0.6 -> the two largest
        tensor([[[ True,  True], [False, False]]])
    """
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    b = attention.shape[0]
    flat = attention.reshape(b, -1).float()
    values, order = flat.sort(dim=1, descending=True, stable=True)
    share = values.cumsum(dim=1) / values.sum(dim=1, keepdim=True).clamp_min(1e-12)
    before = share - values / values.sum(dim=1, keepdim=True).clamp_min(1e-12)  # share held before this patch
    keep_sorted = before < mass - 1e-6  # a patch is kept while the mass held before it is short of the target
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return keep.reshape(attention.shape)


def jaccard(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image intersection over union of (B, H, W) boolean masks; 1 when both are empty."""
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    inter = (pred & target).sum(dim=1).float()
    union = (pred | target).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def upsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) bool patch mask -> (B, H, W) bool pixel mask (nearest neighbour)."""
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0].bool()


def blob_mask(size: tuple[int, int], area: float) -> torch.Tensor:
    """(H, W) bool: a centred isotropic Gaussian blob thresholded to cover ``area`` (a share of the pixels)."""
    h, w = size
    y = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    x = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    dist = y[:, None] ** 2 + x[None, :] ** 2  # the blob's value falls with the squared distance
    n = int(round(min(max(area, 0.0), 1.0) * h * w))
    out = torch.zeros(h * w, dtype=torch.bool)
    out[torch.argsort(dist.flatten(), stable=True)[:n]] = True
    return out.reshape(h, w)


def _pca(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and the top-``k`` principal axes (D, k) of rows ``x`` (N, D), signs fixed so each axis's largest
    coordinate is positive (so a picture does not flip between calls)."""
    mean = x.mean(dim=0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)  # v: (min(N, D), D)
    axes = v[:k].T  # (D, k)
    sign = torch.sign(axes.gather(0, axes.abs().argmax(dim=0, keepdim=True)))
    return mean, axes * torch.where(sign == 0, torch.ones_like(sign), sign)


def pca_patch_maps(patches: torch.Tensor, grid: tuple[int, int], threshold: float = 0.0,
                   foreground: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv2-style PCA maps of patch features.

    Args:
        patches: (B, N, D) patch tokens of B images, N = h * w.
        grid: (h, w).
        threshold: foreground where the first component, min-max scaled to [0, 1] over all patches, is above
            this share (DINOv2 thresholds the raw component at 0; 0 here keeps that rule on the centred projection).
        foreground: (B, N) bool to use instead of the first-component rule.

    Returns:
        rgb (B, h, w, 3) in [0, 1] (background black) and the foreground mask (B, h, w) bool.
    """
    b, n, d = patches.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} patches do not fill a {h}x{w} grid")
    flat = patches.reshape(b * n, d).float()
    if foreground is None:
        mean, axes = _pca(flat, 1)
        first = ((flat - mean) @ axes)[:, 0]  # (B N,)
        if threshold:
            first = (first - first.min()) / (first.max() - first.min()).clamp_min(1e-12) - threshold
        fg = first > 0
    else:
        fg = foreground.reshape(b * n).bool()
    rgb = torch.zeros(b * n, 3)
    if int(fg.sum()) >= 3:
        mean, axes = _pca(flat[fg], 3)
        comp = (flat[fg] - mean) @ axes  # (M, 3)
        lo, hi = comp.min(dim=0).values, comp.max(dim=0).values
        rgb[fg] = (comp - lo) / (hi - lo).clamp_min(1e-12)
    return rgb.reshape(b, h, w, 3), fg.reshape(b, h, w)
