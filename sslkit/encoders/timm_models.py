"""sslkit's own CNN architectures in timm's registry, under an ``sslkit_`` prefix.

Importing :mod:`sslkit` registers them, so exported weights load with timm's one-line call::

    import sslkit, timm
    model = timm.create_model("sslkit_resnet_cifar", pretrained=True, widths=[32, 64, 128, 256],
                              depths=[1, 1, 1, 1], pretrained_cfg_overlay=dict(file="export/model.safetensors"))

Each has a pretrained config (32 px input, ImageNet mean/std, ``num_classes=0``) with no download location: the
weights always come from a local file. ``num_classes=0`` in the config keeps timm's loading strict, so a file
with missing or extra keys is an error rather than a warning. The models return pooled features
(``num_classes=0``); they are the networks inside :class:`sslkit.encoders.Encoder`, built by the same code.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet, make_blocks
from timm.models.vision_transformer import VisionTransformer
from torch import nn

PREFIX = "sslkit_"
DEFAULT_INPUT_SIZE = 32  # the CIFAR / Fashion-MNIST scale these stems were made for


def _cfg(**kw: Any) -> dict[str, Any]:
    return {"url": "", "num_classes": 0, "input_size": (3, DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE),
            "pool_size": None, "crop_pct": 1.0, "interpolation": "bilinear", "fixed_input_size": False,
            "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "first_conv": "conv1", "classifier": "fc",
            "license": "see the sslkit run that produced the weights", **kw}


# Read by timm's register_model when the entry points below are registered (it must exist before them).
default_cfgs = generate_default_cfgs({f"{PREFIX}resnet_cifar": _cfg(), f"{PREFIX}resnet18_cifar": _cfg(),
                                      f"{PREFIX}vit_convstem": _cfg(first_conv="patch_embed.proj.0",
                                                                    classifier="head")})


class StagedResNet(ResNet):
    """timm's ResNet with any number of stages (``stage_names``); timm's forward hard-codes four.

    A subclass, not a patched ``forward_features`` closure: a closure would keep pointing at the original
    module after ``copy.deepcopy`` (DINO's teacher), so the copy would run the original's weights.
    """

    stage_names: list[str]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x


def _resnet_cifar(widths: list[int] = (64, 128, 256, 512), depths: list[int] = (2, 2, 2, 2), stem_stride: int = 1,
                  zero_init_last: bool = True, pool_grid: int = 1, num_classes: int = 0, in_chans: int = 3,
                  **kwargs: Any) -> StagedResNet:
    widths, depths = tuple(int(w) for w in widths), tuple(int(d) for d in depths)
    if len(widths) != len(depths) or not widths or min(widths) <= 0 or min(depths) <= 0:
        raise ValueError(f"resnet_cifar needs widths and depths of the same non-zero length with positive entries, "
                         f"got widths={list(widths)} depths={list(depths)}")
    if stem_stride not in (1, 2):
        raise ValueError(f"resnet_cifar stem_stride must be 1 or 2, got {stem_stride}")
    if int(pool_grid) < 1:
        raise ValueError(f"resnet_cifar pool_grid must be a positive integer (1 = global average pool), got {pool_grid}")
    if num_classes:
        raise ValueError(f"{PREFIX}resnet_cifar is a feature extractor: num_classes must be 0, got {num_classes}")
    model = StagedResNet(BasicBlock, depths, num_classes=0, in_chans=in_chans, channels=widths,
                         zero_init_last=zero_init_last, **kwargs)
    model.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, stride=stem_stride, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(widths[0])
    model.maxpool = nn.Identity()
    for name in [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, n)]:
        delattr(model, name)
    stages, _ = make_blocks((BasicBlock,) * len(widths), widths, depths, widths[0])
    for name, stage in stages:
        model.add_module(name, stage)
    model.stage_names = [name for name, _ in stages]
    model.num_features = widths[-1]
    if int(pool_grid) > 1:
        model.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(int(pool_grid)), nn.Flatten(1))  # (B, C * g * g)
        model.num_features = widths[-1] * int(pool_grid) ** 2
    model.init_weights(zero_init_last=zero_init_last)
    return model


def _resnet18_cifar(zero_init_last: bool = True, num_classes: int = 0, in_chans: int = 3, **kwargs: Any) -> ResNet:
    model = ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_chans=in_chans, zero_init_last=zero_init_last,
                   **kwargs)
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register_model
def sslkit_resnet_cifar(pretrained: bool = False, **kwargs: Any) -> StagedResNet:
    """A CIFAR-style ResNet of any width and depth (``widths``, ``depths``, ``stem_stride``, ``pool_grid``): 3x3
    stem, no max-pool, one BasicBlock stage per entry, each after the first halving the resolution."""
    return build_model_with_cfg(_resnet_cifar, f"{PREFIX}resnet_cifar", pretrained, **kwargs)


@register_model
def sslkit_resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """timm's ResNet-18 with a 3x3 stride-1 first conv and no max-pool (the SimCLR paper's CIFAR setting)."""
    return build_model_with_cfg(_resnet18_cifar, f"{PREFIX}resnet18_cifar", pretrained, **kwargs)


class ConvStemPatchEmbed(PatchEmbed):
    """A ViT patch embedding made of 3x3 stride-2 convolutions (each with BatchNorm and ReLU) and a final 1x1
    convolution to the embedding width, instead of one patch-sized convolution: the convolutional stem of Xiao et
    al. 2021, "Early Convolutions Help Transformers See Better", which trains faster and is less sensitive to the
    learning rate. ``patch_size`` must be a power of two (one stride-2 convolution per factor of two); the widths
    double up to ``embed_dim`` (for ViT-Tiny/4: 96, 192, then 1x1 to 192). The token grid, and so everything that
    reads ``patch_size``, is the same as with a plain patch embedding.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        size = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1] or size < 2 or size & (size - 1):
            raise ValueError(f"a convolutional stem needs a square power-of-two patch size, got {self.patch_size}")
        in_chans, dim = self.proj.in_channels, self.proj.out_channels
        stages = size.bit_length() - 1
        layers: list[nn.Module] = []
        width = in_chans
        for i in range(stages):
            out = max(dim >> (stages - 1 - i), 8)
            layers += [nn.Conv2d(width, out, kernel_size=3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            width = out
        layers.append(nn.Conv2d(width, dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)


def _vit_convstem(num_classes: int = 0, **kwargs: Any) -> VisionTransformer:
    if num_classes:
        raise ValueError(f"{PREFIX}vit_convstem is a feature extractor: num_classes must be 0, got {num_classes}")
    return VisionTransformer(num_classes=0, embed_layer=ConvStemPatchEmbed, **kwargs)


@register_model
def sslkit_vit_convstem(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """timm's VisionTransformer with :class:`ConvStemPatchEmbed` (any ``patch_size``, ``embed_dim``, ``depth``...)."""
    return build_model_with_cfg(_vit_convstem, f"{PREFIX}vit_convstem", pretrained, **kwargs)
