"""timm-backed encoders with one interface.

``ENCODERS.build(name, **kw)`` returns an :class:`Encoder`: ``forward(x) -> (B, dim)`` pooled features, and
``forward_tokens(x, keep=None, mask=None) -> Tokens(cls (B, D), registers (B, R, D), patches (B, N, D))``:

- ViTs: the class token, the register tokens ("Vision Transformers Need Registers", Darcet et al. 2024; the
  ``reg_tokens`` option, 0 by default) and the patch tokens, after the final norm. ``keep`` (B, K) runs only the
  listed patches through the blocks (MAE); ``mask`` (B, L) bool replaces the masked patches' embeddings with a
  learned mask token before the position embedding (iBOT, DINOv2). ``patch_size`` and :meth:`Encoder.patch_grid`
  give the grid. Their pooled feature (``pool``) is the class token ("token"), the mean patch token ("avg") or the
  patch grid average-pooled to ``pool_grid`` x ``pool_grid`` and flattened ("grid"), which keeps where things are,
  as ``resnet_cifar``'s ``pool_grid`` does for a CNN.
- CNNs: the last feature map as a grid of ``feature_stride``-pixel patches (``patches`` (B, h*w, C), ``cls`` their
  mean, no registers), so dense tools work on them too; ``patch_size`` is None.

Weights are always randomly initialised: nothing is downloaded.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sslkit.encoders import timm_models  # noqa: F401  (registers sslkit_* architectures with timm)
from sslkit.registry import ENCODERS, check_layers

VIT_POOLS = ("token", "avg", "grid")
DEFAULT_POOL_GRID = 2  # side of the pooled patch grid of pool "grid"


class Tokens(NamedTuple):
    """An encoder's tokens: ``cls`` (B, D), ``registers`` (B, R, D) (R may be 0), ``patches`` (B, N, D) in
    row-major grid order (N = h * w, or K kept patches)."""

    cls: torch.Tensor
    registers: torch.Tensor
    patches: torch.Tensor


class Encoder(nn.Module):
    """Wraps a timm model. ``dim`` is the pooled feature size; ``patch_size`` is None for CNNs.

    Attributes:
        num_registers: register tokens of a ViT (0 without, and for CNNs).
        mask_token: (1, 1, D) learned embedding that replaces masked patches (ViTs); None until an objective
            that masks (iBOT) calls :meth:`enable_mask_token`, so other objectives carry no unused parameter
            (which DDP would refuse) and their weights files keep their keys.
        timm_config: ``(architecture, kwargs)`` such that ``timm.create_model(architecture, **kwargs)`` builds
            ``model`` with the same keys and the same pooled features (what ``sslkit export --format timm``
            writes); None for a model timm cannot build.
    """

    def __init__(self, model: nn.Module, name: str, pool: str = "token",
                 timm_config: tuple[str, dict] | None = None, pool_grid: int = DEFAULT_POOL_GRID) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.is_vit = isinstance(model, VisionTransformer)
        check_pool(pool, pool_grid)
        self.pool = pool
        self.pool_grid = int(pool_grid)
        self.dim: int = int(model.num_features) * (self.pool_grid ** 2 if pool == "grid" else 1)
        # timm has no grid pooling: its model of these weights would hand out other features
        self.timm_config = timm_config if pool != "grid" else None
        self.patch_size: int | None = None
        self.num_registers = 0
        if self.is_vit:
            ps = model.patch_embed.patch_size
            self.patch_size = int(ps[0] if isinstance(ps, tuple | list) else ps)
            self.num_prefix_tokens = int(model.num_prefix_tokens)
            self.num_registers = int(getattr(model, "num_reg_tokens", 0) or 0)
        self.mask_token: nn.Parameter | None = None

    def enable_mask_token(self) -> None:
        """Add the learned mask token (zero-initialised, as in DINOv2) that ``forward_tokens(mask=...)`` uses."""
        if not self.is_vit:
            raise TypeError(f"encoder {self.name!r} is a CNN: it has no patch embeddings to mask")
        if self.mask_token is None:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, int(self.model.embed_dim)))

    @property
    def is_cnn(self) -> bool:
        return not self.is_vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, dim)."""
        if not self.is_vit:
            return self.model(x)
        return self.pool_tokens(self.forward_tokens(x), self.patch_grid(x.shape[-2], x.shape[-1]))

    def pool_tokens(self, tokens: Tokens, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The pooled feature (B, dim) of a ViT's tokens (``pool``): the class token, the mean patch token, or the
        patch grid average-pooled to ``pool_grid`` x ``pool_grid`` and flattened (channel-major, as a CNN's
        pooled map). ``grid``: the patches' (h, w), needed for "grid" (default: a square grid)."""
        if self.pool == "token":
            return tokens.cls
        if self.pool == "avg":
            return tokens.patches.mean(dim=1)
        b, n, d = tokens.patches.shape
        h, w = grid if grid is not None else (math.isqrt(n), math.isqrt(n))
        if h * w != n:
            raise ValueError(f"pool 'grid' needs the patch grid: {n} patch tokens are not a {h}x{w} grid")
        fmap = tokens.patches.transpose(1, 2).reshape(b, d, h, w)
        return F.adaptive_avg_pool2d(fmap, self.pool_grid).flatten(1)

    def forward_tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None) -> Tokens:
        """(B, 3, H, W) -> :class:`Tokens` (class token, registers, patches).

        Args:
            keep: ViTs, (B, K) long: the patches to run through the blocks (the rest are dropped after the
                position embedding, so compute scales with K); ``patches`` then holds the K kept ones.
            mask: ViTs, (B, L) bool over the h x w grid (row-major): these patches enter as the learned
                ``mask_token`` (plus their position embedding) instead of their pixels' embedding.
        """
        if not self.is_vit:
            if keep is not None or mask is not None:
                raise TypeError(f"encoder {self.name!r} is a CNN: it takes no patch mask or kept-patch list")
            fmap = self.model.forward_features(x)  # (B, C, h, w)
            patches = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
            return Tokens(patches.mean(dim=1), patches[:, :0], patches)
        m = self.model
        t = m.patch_embed(x)  # (B, h, w, D) with dynamic image sizes, else (B, L, D)
        if mask is not None:
            if self.mask_token is None:
                raise RuntimeError(f"encoder {self.name!r} has no mask token: an objective that masks patches calls "
                                   "encoder.enable_mask_token() when it is built")
            grid_shape = t.shape[:-1]
            if mask.shape != (grid_shape[0], math.prod(grid_shape[1:])):
                raise ValueError(f"mask must be (B, L) = {(grid_shape[0], math.prod(grid_shape[1:]))} for this "
                                 f"input, got {tuple(mask.shape)}")
            t = torch.where(mask.reshape(grid_shape).unsqueeze(-1), self.mask_token.to(t.dtype), t)
        t = m._pos_embed(t)  # (B, P + L, D) with P prefix tokens; interpolates pos-embed for other sizes
        t = m.patch_drop(t)
        t = m.norm_pre(t)
        p = self.num_prefix_tokens
        if keep is not None:
            patches = torch.gather(t[:, p:], 1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # (B, K, D)
            t = torch.cat([t[:, :p], patches], dim=1)
        t = m.blocks(t)
        t = m.norm(t)
        return Tokens(t[:, 0], t[:, p - self.num_registers:p], t[:, p:])

    def patch_grid(self, height: int, width: int | None = None) -> tuple[int, int]:
        """(h, w) of the patch grid for an input of this size: ViT patches, or the CNN's last feature map (whose size
        padding can round up, so it is measured, once per input size)."""
        width = height if width is None else width
        if self.patch_size is not None:
            return height // self.patch_size, width // self.patch_size
        cache = self.__dict__.setdefault("_grids", {})
        if (height, width) not in cache:
            param = next(self.model.parameters())
            with torch.no_grad():
                fmap = self.model.forward_features(torch.zeros(1, 3, height, width, device=param.device,
                                                               dtype=param.dtype))
            cache[(height, width)] = (int(fmap.shape[-2]), int(fmap.shape[-1]))
        return cache[(height, width)]

    @property
    def feature_stride(self) -> int:
        """Input pixels per patch side: the ViT patch size, or the CNN's total downsampling (measured once)."""
        if self.patch_size is not None:
            return self.patch_size
        if not hasattr(self, "_feature_stride"):
            probe = 64
            param = next(self.model.parameters())
            with torch.no_grad():
                fmap = self.model.forward_features(torch.zeros(1, 3, probe, probe, device=param.device,
                                                               dtype=param.dtype))
            self._feature_stride = probe // int(fmap.shape[-1])
        return self._feature_stride

    def num_patches(self, image_size: int) -> int:
        if self.patch_size is None:
            raise TypeError(f"encoder {self.name!r} has no patches")
        return (image_size // self.patch_size) ** 2

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that take no weight decay besides biases and norms."""
        inner = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return {f"model.{n}" for n in inner} | ({"mask_token"} if self.mask_token is not None else set())


ATTENTION_MODES = ("auto", "fused", "math")


def fused_attention_wanted(mode: str, device_type: str, bf16: bool) -> bool:
    """Whether ViT attention should run through ``F.scaled_dot_product_attention`` (fused) or timm's plain
    ``softmax(q k^T / sqrt(d)) v`` (math). Both compute the same attention; only the kernels differ.

    ``auto`` picks math on a CPU under bf16 autocast and the fused kernel everywhere else. Measured on 2 AMD
    Zen 5 cores (torch 2.14.1, one timm Attention forward and backward, bf16 autocast), the CPU's fused kernel
    is the slower one at every sequence length tried: 2.1x slower at 17 tokens (MAE's visible tokens), 2.9x at
    65 (its decoder), 1.3-1.5x at 197-577 (ViT-S/16 at 224-384 px); in fp32 the two are within 10% up to 257
    tokens and fused wins beyond (1.4x at 577). On CUDA the fused kernels (flash, memory-efficient) win.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {', '.join(ATTENTION_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode == "fused"
    return not (device_type == "cpu" and bf16)


def set_fused_attention(module: nn.Module, fused: bool) -> dict[nn.Module, bool]:
    """Switch every timm attention layer inside ``module`` (encoders, MAE's decoder, a teacher) to the fused
    or the math path. Returns each switched layer's previous setting (empty for a CNN), for
    :func:`restore_attention`."""
    before = {}
    for m in module.modules():
        if isinstance(getattr(m, "fused_attn", None), bool):
            before[m] = m.fused_attn
            m.fused_attn = bool(fused)
    return before


def restore_attention(before: dict[nn.Module, bool]) -> None:
    """Undo :func:`set_fused_attention`."""
    for m, fused in before.items():
        m.fused_attn = fused


def _timm(name: str, **kw) -> nn.Module:
    kw.setdefault("num_classes", 0)
    return timm.create_model(name, pretrained=False, **kw)


def _timm_config(arch: str, **kw) -> tuple[str, dict]:
    """``(arch, kwargs)`` for :attr:`Encoder.timm_config`: the arguments that shape the weights and the features
    (initialisation-only ones such as ``zero_init_last`` are left out), with ``num_classes=0``."""
    return arch, {**{k: v for k, v in kw.items() if k != "zero_init_last"}, "num_classes": 0}


@ENCODERS.register("resnet18_cifar", help="ResNet-18 with a 3x3 stride-1 stem and no max-pool (for 32 px)")
def resnet18_cifar(zero_init_residual: bool = True) -> Encoder:
    """ResNet-18 for small images: 3x3 stride-1 first conv, no max-pool (SimCLR paper, CIFAR setting); timm's
    ``sslkit_resnet18_cifar``."""
    model = _timm("sslkit_resnet18_cifar", zero_init_last=zero_init_residual)
    return Encoder(model, "resnet18_cifar", timm_config=_timm_config("sslkit_resnet18_cifar"))


@ENCODERS.register("resnet_cifar", help="ResNet with BasicBlocks, chosen widths and depths, 3x3 stem (small images)")
def resnet_cifar(widths: list[int] = (64, 128, 256, 512), depths: list[int] = (2, 2, 2, 2), stem_stride: int = 1,
                 zero_init_residual: bool = True, pool_grid: int = 1) -> Encoder:
    """A CIFAR-style ResNet of any width and depth: 3x3 stem (stride ``stem_stride``), no max-pool, one stage per
    entry of ``widths``/``depths``, each after the first halving the resolution.

    The defaults are the CIFAR ResNet-18. Narrow, shallow ones are the fast CPU encoders: widths (32, 64, 128, 256)
    with one block per stage costs 0.105 GFLOP per 28 px image, a ninth of the ResNet-18's 0.95.

    ``pool_grid`` g > 1 average-pools the last feature map to a g x g grid and flattens it (``dim`` is
    ``widths[-1] * g * g``): the feature keeps where things are, which matters for aligned images such as
    Fashion-MNIST. 1 is the usual global average pool.
    """
    check_layers("resnet_cifar: the number of stages (len(encoder.widths))", len(widths))
    for d in depths:
        check_layers("resnet_cifar: each of encoder.depths", d)
    kw = {"widths": [int(w) for w in widths], "depths": [int(d) for d in depths], "stem_stride": int(stem_stride),
          "pool_grid": int(pool_grid)}
    model = _timm("sslkit_resnet_cifar", zero_init_last=zero_init_residual, **kw)  # timm_models.py builds it
    return Encoder(model, "resnet_cifar", timm_config=_timm_config("sslkit_resnet_cifar", **kw))


@ENCODERS.register("resnet50", help="ResNet-50 (ImageNet stem), 2048-d features")
def resnet50(zero_init_residual: bool = True) -> Encoder:
    return Encoder(_timm("resnet50", zero_init_last=zero_init_residual), "resnet50",
                   timm_config=_timm_config("resnet50"))


def check_pool(pool: str, pool_grid: int) -> None:
    """A ViT's ``pool`` and ``pool_grid`` must name a pooling sslkit has (checked by :class:`Encoder`)."""
    if pool not in VIT_POOLS:
        raise ValueError(f"encoder pool must be one of {', '.join(VIT_POOLS)}, got {pool!r}")
    if isinstance(pool_grid, bool) or not isinstance(pool_grid, int | np.integer) or pool_grid < 1:
        raise ValueError(f"encoder pool_grid must be a positive integer (the side of the pooled patch grid), "
                         f"got {pool_grid!r}")


def _vit(name: str, pool: str, pool_grid: int = DEFAULT_POOL_GRID, **kw) -> Encoder:
    if kw.get("reg_tokens") == 0:
        kw.pop("reg_tokens")
    kw.setdefault("dynamic_img_size", True)  # interpolate position embeddings for multi-crop sizes
    kw.setdefault("global_pool", "token" if pool == "token" else "avg")
    # The final LayerNorm applies to every token (not timm's post-pool `fc_norm`), so forward_tokens, the
    # pooled features and MAE's decoder all see normalised tokens, whichever pooling the recipe picks.
    kw.setdefault("fc_norm", False)
    return Encoder(_timm(name, **kw), name, pool=pool, timm_config=_timm_config(name, **kw), pool_grid=pool_grid)


@ENCODERS.register("vit_tiny_patch4_32", help="ViT-Tiny (192-d, 12 blocks, 3 heads) with 4-px patches, for 32 px")
def vit_tiny_patch4_32(img_size: int = 32, depth: int = 12, embed_dim: int = 192, num_heads: int = 3,
                       mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, pool: str = "token",
                       reg_tokens: int = 0, conv_stem: bool = False, pool_grid: int = DEFAULT_POOL_GRID) -> Encoder:
    """ViT-Tiny for small images: 4x4 patches (64 tokens at 32 px, 49 at 28 px); ``reg_tokens`` register tokens;
    ``conv_stem`` embeds the patches with two 3x3 stride-2 convolutions instead of one 4x4 one
    (:class:`sslkit.encoders.timm_models.ConvStemPatchEmbed`); ``pool`` "token", "avg" or "grid" (the patch
    tokens pooled to ``pool_grid`` x ``pool_grid`` and flattened: see :meth:`Encoder.pool_tokens`)."""
    if reg_tokens < 0:
        raise ValueError(f"reg_tokens must be >= 0, got {reg_tokens}")
    check_layers("encoder.depth", depth)
    kw = dict(img_size=img_size, patch_size=4, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
              mlp_ratio=mlp_ratio, reg_tokens=reg_tokens, dynamic_img_size=True,
              global_pool="token" if pool == "token" else "avg", fc_norm=False)  # final norm on every token; see _vit
    if conv_stem:
        model = timm_models.sslkit_vit_convstem(drop_path_rate=drop_path_rate, **kw)
        config = _timm_config(f"{timm_models.PREFIX}vit_convstem", **kw)
    else:
        model = VisionTransformer(num_classes=0, drop_path_rate=drop_path_rate, **kw)
        # timm's ViT-Tiny entry point with these arguments builds the same network (exports load with it)
        config = _timm_config("vit_tiny_patch16_224", **kw)
    return Encoder(model, "vit_tiny_patch4_32", pool=pool, timm_config=config, pool_grid=pool_grid)


@ENCODERS.register("vit_small_patch16_224", help="ViT-S/16 (384-d), the DINO paper's main model")
def vit_small_patch16_224(img_size: int = 224, drop_path_rate: float = 0.1, pool: str = "token",
                          reg_tokens: int = 0, pool_grid: int = DEFAULT_POOL_GRID) -> Encoder:
    return _vit("vit_small_patch16_224", pool, pool_grid, img_size=img_size, drop_path_rate=drop_path_rate,
                reg_tokens=reg_tokens)


@ENCODERS.register("vit_base_patch16_224", help="ViT-B/16 (768-d), the MAE paper's base model")
def vit_base_patch16_224(img_size: int = 224, drop_path_rate: float = 0.0, pool: str = "token",
                         reg_tokens: int = 0, pool_grid: int = DEFAULT_POOL_GRID) -> Encoder:
    return _vit("vit_base_patch16_224", pool, pool_grid, img_size=img_size, drop_path_rate=drop_path_rate,
                reg_tokens=reg_tokens)


def _any_timm(name: str, **kw) -> Encoder:
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise ValueError(f"timm has no model {name!r}. Similar: {close}. See timm.list_models().")
    pool = kw.pop("pool", "token")
    pool_grid = kw.pop("pool_grid", DEFAULT_POOL_GRID)
    model = _timm(name, **kw)
    if isinstance(model, VisionTransformer):
        return _vit(name, pool, pool_grid, **kw)
    return Encoder(model, f"timm:{name}", timm_config=_timm_config(name, **kw))


ENCODERS.register_prefix("timm", _any_timm)
