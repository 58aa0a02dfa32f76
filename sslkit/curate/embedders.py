"""What turns image views into vectors for curation: a built-in copy descriptor, an sslkit run, or a local timm model.

Every embedder takes float views in ``[0, 1]``, ``(B, 3, s, s)`` with ``s = embedder.image_size``, and returns
L2-normalised ``(B, dim)`` float32 rows, so inner products are cosine similarities. ``embedder.key`` names the
weights and settings; it is part of the embedding cache's key.

The built-in :class:`CopyDescriptor` needs no training. Copy detection asks "is this the same picture", not
"the same kind of thing", so it describes where the edges of the picture lie and which way they run (a
histogram of oriented gradients, Dalal & Triggs 2005, on a 32-pixel grayscale view):

1. grayscale (the mean of the channels): a tint or a colour change moves all channels together;
2. a 32-pixel view: resizing and JPEG blocks mostly vanish at this scale;
3. gradients ignore a brightness shift, the unit norm a contrast change; the half-overlapping cells absorb the
   small misalignment between a crop and its source's nearest window.

Crops are handled by the views (:mod:`sslkit.curate.embed`), not the descriptor: each image is also described
through a grid of sub-windows, and a copy cropped to half its area matches one of its source's sub-windows.
``benchmarks/curate_dedup.py`` measures it per kind of duplicate.

Example::

    emb = load_embedder("builtin")
    v = emb(torch.rand(4, 3, emb.image_size, emb.image_size))  # (4, emb.dim), unit rows
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sslkit.augment.base import IMAGENET_MEAN, IMAGENET_STD

DESCRIPTOR_SIZE = 32  # side of the view the built-in descriptor reads
HOG_CELL = 4  # pixels per histogram cell: 8 x 8 cells on a 32-pixel view
HOG_BINS = 8  # signed gradient orientations
DEFAULT_TIMM_IMAGE_SIZE = 224
EPS = 1e-6


class CopyDescriptor(nn.Module):
    """Histograms of oriented gradients of the grayscale view, root-normalised. ``(B, 3, s, s) -> (B, bins * cells²)``.

    ``cells = s / cell`` per side; each cell pools twice its width (half-overlapping neighbours), so a shift of a
    pixel or two, which the crop windows leave, moves little mass between cells.
    """

    def __init__(self, size: int = DESCRIPTOR_SIZE, cell: int = HOG_CELL, bins: int = HOG_BINS) -> None:
        super().__init__()
        if size % cell or cell % 2:
            raise ValueError(f"descriptor size {size} must be a multiple of the (even) cell size {cell}")
        self.size, self.cell, self.bins = size, cell, bins
        self.image_size = size
        self.dim = bins * (size // cell) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.float().mean(1, keepdim=True)  # (B, 1, s, s): a tint moves all channels together
        gx = F.pad(g[..., :, 2:] - g[..., :, :-2], (1, 1, 0, 0))  # central differences, (B, 1, s, s)
        gy = F.pad(g[..., 2:, :] - g[..., :-2, :], (0, 0, 1, 1))
        mag = (gx.square() + gy.square()).sqrt()
        pos = (torch.atan2(gy, gx) + math.pi) / (2 * math.pi) * self.bins  # signed orientation in [0, bins]
        lo = pos.floor().long() % self.bins
        frac = pos - pos.floor()
        hist = torch.zeros(g.shape[0], self.bins, *g.shape[-2:], device=g.device)  # (B, bins, s, s)
        hist.scatter_add_(1, lo, mag * (1 - frac))  # each gradient split between its two nearest bins
        hist.scatter_add_(1, (lo + 1) % self.bins, mag * frac)
        c = self.cell
        cells = F.avg_pool2d(hist, 2 * c, c, padding=c // 2, count_include_pad=False).flatten(1)  # (B, dim)
        # unit norm cancels contrast (gradients ignore brightness); the square root (Hellinger) keeps a few strong
        # edges from dominating the cosine
        cells = cells / cells.norm(dim=1, keepdim=True).clamp_min(EPS)
        return F.normalize(cells.sqrt(), dim=1)


class Embedder:
    """A frozen encoder behind the curation interface: ``[0, 1]`` views in, unit rows out."""

    def __init__(self, module: nn.Module, image_size: int, key: str, normalize_input: bool,
                 device: str | torch.device = "cpu") -> None:
        self.module = module.eval().to(device)
        self.image_size, self.key, self.normalize_input = int(image_size), key, normalize_input
        self.device = torch.device(device)
        self.dim = int(module.dim) if hasattr(module, "dim") else int(getattr(module, "num_features", 0))
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        x = views.to(self.device, torch.float32)  # (B, 3, s, s) in [0, 1]
        if self.normalize_input:
            x = (x - self._mean) / self._std
        return F.normalize(self.module(x).float(), dim=1).cpu()  # (B, D)


def _load_timm(name: str, weights: str | None, image_size: int | None, device: str) -> Embedder:
    """A local timm model, loaded as ``sslkit eval`` loads a ``timm:`` source (safe weights loading, strict keys,
    the model's own mean/std, export folders too)."""
    from sslkit.eval.sources import identity_hash, load_timm_source, parse_source, timm_source_image_size
    from sslkit.run import RunError

    if not weights:
        raise RunError(f"timm:{name} needs --weights FILE (a local .safetensors, .pth or .bin state dict): nothing is "
                       "downloaded, and random weights would make every image look alike.")
    source = parse_source(f"timm:{name}", weights)
    model, identity = load_timm_source(source)
    size = image_size or timm_source_image_size(source) or DEFAULT_TIMM_IMAGE_SIZE
    return Embedder(model, size, f"timm:{name}:{identity_hash(identity)[:16]}:{size}", True, device)


def load_embedder(spec: str = "builtin", *, weights: str | None = None, image_size: int | None = None,
                  device: str = "cpu") -> Embedder:
    """``builtin``, an sslkit run directory, or ``timm:<name>`` with local ``weights``.

    ``image_size`` overrides the run's evaluation resolution (runs) or 224 (timm); the built-in descriptor
    has its own.
    """
    if spec == "builtin":
        return Embedder(CopyDescriptor(), DESCRIPTOR_SIZE, f"builtin:hog:{DESCRIPTOR_SIZE}:{HOG_CELL}:{HOG_BINS}", False, device)
    if spec.startswith("timm:"):
        return _load_timm(spec[len("timm:"):], weights, image_size, device)
    from sslkit.eval.features import encoder_hash
    from sslkit.run import eval_image_size, load_encoder

    encoder, cfg = load_encoder(spec)
    size = image_size or eval_image_size(cfg)
    return Embedder(encoder, size, f"run:{encoder_hash(encoder)[:16]}:{size}", True, device)
