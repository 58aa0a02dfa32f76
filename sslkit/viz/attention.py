"""Self-attention maps of a ViT's last block, one panel per head (DINO paper, Caron et al. 2021, figs. 1 and 3).

For each image, the attention of the CLS token to every patch in the last block is shown per head. With
DINO-trained ViTs, heads attend to object parts and the maps segment the foreground without supervision.

timm runs fused attention (no attention matrix is ever formed), so a forward pre-hook on the last block's
``attn`` module captures its input tokens and the softmax(q k^T / sqrt(d)) matrix is recomputed from the
module's own ``qkv`` projection.

Example::

    encoder, cfg = load_encoder("runs/dino_vit_tiny_fmnist-latest")
    maps = attention_maps(encoder, images)   # (B, heads, H/p, W/p)

    sslkit viz attention runs/dino_vit_tiny_fmnist-latest cat.png dog.jpg --out attn/
    sslkit viz attention runs/dino_vit_tiny_fmnist-latest --from-dataset 8
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sslkit.augment.base import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from sslkit.registry import error_line

NOT_A_VIT = "attention maps need a ViT encoder"
PANEL_INCHES = 2.0  # size of one panel in the figure
COLORMAP = "inferno"


def _vit_model(encoder: nn.Module) -> nn.Module:
    """The timm VisionTransformer inside an sslkit Encoder (or a bare one); a clear error for CNNs."""
    model = getattr(encoder, "model", encoder)
    is_vit = getattr(encoder, "is_vit", None)
    if not (is_vit if is_vit is not None else hasattr(model, "blocks")):
        name = getattr(encoder, "name", type(encoder).__name__)
        raise TypeError(f"{NOT_A_VIT}; encoder {name!r} is a CNN (it has no attention blocks). Train a ViT "
                        "recipe, e.g. recipes/dino_vit_tiny_fmnist.yaml.")
    return model


@torch.no_grad()
def last_block_attention(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Full attention matrices of the last transformer block, per head.

    Args:
        encoder: an sslkit ViT :class:`~sslkit.encoders.Encoder` (or a timm VisionTransformer).
        images: (B, 3, H, W) normalised images; H and W multiples of the patch size.

    Returns:
        (B, heads, N, N) softmax attention, N = prefix tokens (CLS) + patches; each row sums to 1.
    """
    model = _vit_model(encoder)
    attn = model.blocks[-1].attn
    captured: list[torch.Tensor] = []

    def grab_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["x"])  # (B, N, D): the block's normalised tokens

    handle = attn.register_forward_pre_hook(grab_input, with_kwargs=True)
    try:
        encoder(images)
    finally:
        handle.remove()
    x = captured[-1]
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # (B, h, N, d)
    return torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)  # (B, h, N, N)


@torch.no_grad()
def attention_maps(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """CLS-token attention to each patch in the last block, per head.

    Paper: Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", fig. 1.

    Args:
        encoder: ViT encoder (eval mode recommended).
        images: (B, 3, H, W) normalised images.

    Returns:
        (B, heads, H / patch, W / patch); each map sums to at most 1 (the rest goes to the prefix tokens).

    Example:
        >>> maps = attention_maps(encoder, torch.randn(2, 3, 32, 32))   # ViT-Tiny/4: (2, 3, 8, 8)
    """
    model = _vit_model(encoder)
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    patch = model.patch_embed.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    h, w = images.shape[-2] // ph, images.shape[-1] // pw
    attn = last_block_attention(encoder, images)  # (B, heads, N, N)
    cls_to_patches = attn[:, :, 0, n_prefix:]  # (B, heads, L)
    if cls_to_patches.shape[-1] != h * w:
        raise ValueError(f"got {cls_to_patches.shape[-1]} patch tokens for a {h}x{w} grid; use an image size "
                         f"that is a multiple of the patch size {ph}")
    return cls_to_patches.reshape(images.shape[0], -1, h, w)


def denormalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """(B, 3, H, W) normalised -> values in [0, 1] for display."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (images.cpu().float() * s + m).clamp(0, 1)


def save_figure(image: torch.Tensor, maps: torch.Tensor, path: Path, title: str = "") -> Path:
    """One row: the input image, one attention heat map per head (upsampled by nearest neighbour), then DINO's
    thresholded map: the patches holding 60% of the mean attention's mass (:func:`sslkit.viz.dense.mass_mask`)
    over the image.

    Args:
        image: (3, H, W) in [0, 1].
        maps: (heads, h, w) attention of the CLS token.
    """
    import matplotlib

    from sslkit.viz.dense import DINO_MASS, mass_mask, upsample_mask

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = maps.shape[0]
    up = F.interpolate(maps[None].float(), size=image.shape[-2:], mode="nearest")[0]  # (heads, H, W)
    kept = upsample_mask(mass_mask(maps.float().mean(dim=0, keepdim=True)), tuple(image.shape[-2:]))[0]  # (H, W)
    fig, axes = plt.subplots(1, heads + 2, figsize=(PANEL_INCHES * (heads + 2), PANEL_INCHES + 0.4))
    axes[0].imshow(image.permute(1, 2, 0).numpy())
    axes[0].set_title(title or "input", fontsize=8)
    for i in range(heads):
        axes[i + 1].imshow(up[i].numpy(), cmap=COLORMAP)
        axes[i + 1].set_title(f"head {i}", fontsize=8)
    axes[-1].imshow((image * (0.25 + 0.75 * kept.float())).permute(1, 2, 0).numpy())
    axes[-1].set_title(f"{DINO_MASS:.0%} of the attention", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    from sslkit.run import save_figure_png

    save_figure_png(fig, path, 100)
    plt.close(fig)
    return path


def load_image_files(paths: Sequence[str | Path], image_size: int) -> torch.Tensor:
    """Read images with PIL, resize + centre-crop to ``image_size``, normalise -> (B, 3, S, S)."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    tf = eval_transform(image_size)
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"image {p} not found")
        with Image.open(p) as im:
            out.append(tf(pil_to_tensor(im.convert("RGB"))))
    return torch.stack(out)


def dataset_images(cfg, n: int, image_size: int, dataset: str | None = None) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` images of the run's evaluation split (or of registered ``dataset``'s test split), as the
    evaluation sees them -> (n, 3, S, S)."""
    from sslkit.run import build_dataset

    if dataset:
        from sslkit.plugins import load_all
        from sslkit.registry import DATASETS

        load_all()
        ds = DATASETS.build(dataset, split="test", root=cfg.data.get("root"))
    else:
        ds = build_dataset(cfg, cfg.data.get("eval_split", "test"))
    tf = eval_transform(image_size)
    n = min(n, len(ds))
    items = [ds[i] for i in range(n)]
    names = [_file_safe(f"{dataset or cfg.data.name}_{i:04d}_{ds.classes[label] if 0 <= label < len(ds.classes) else label}")
             for i, (_, label) in enumerate(items)]
    return torch.stack([tf(img) for img, _ in items]), names


def _file_safe(name: str) -> str:
    """Class names such as "T-shirt/top" as file names: "T-shirt_top"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def add_image_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    """The arguments of the picture commands: RUN, image files and/or dataset images, output, size, device."""
    parser.add_argument("run", metavar="RUN", help="run directory (or its -latest link)")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files (any PIL format)")
    parser.add_argument("--from-dataset", type=int, default=0, metavar="N",
                        help="also use the first N images of the run's evaluation split (or of --dataset)")
    parser.add_argument("--dataset", default=None, metavar="NAME",
                        help="take --from-dataset images from this registered dataset's test split instead, e.g. "
                             "fmnist_scenes (see `sslkit list datasets`)")
    parser.add_argument("--out", default=None, help=out_help)
    parser.add_argument("--image-size", type=int, default=None,
                        help="input resolution (a multiple of the patch size; default: the run's evaluation size). "
                             "Larger than the training size gives finer maps, as in the paper's figures")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_image_arguments(parser, "output folder (default: RUN/attention); the run needs a ViT encoder")


def run(args: argparse.Namespace) -> int:
    """``sslkit viz attention RUN [IMAGE ...] [--from-dataset N] [--out DIR]``: one PNG per image."""
    from sslkit.run import eval_image_size, load_encoder, resolve_run_dir

    if not args.images and args.from_dataset <= 0:
        print("sslkit: error: give image files and/or --from-dataset N", file=sys.stderr)
        return 2
    encoder, cfg = load_encoder(args.run, map_location="cpu")
    try:
        _vit_model(encoder)
    except TypeError as e:
        print(f"sslkit: error: {error_line(e)}", file=sys.stderr)
        return 2
    encoder = encoder.to(args.device).eval()
    size = args.image_size or eval_image_size(cfg)
    batches: list[tuple[torch.Tensor, list[str]]] = []
    if args.images:
        batches.append((load_image_files(args.images, size), [Path(p).stem for p in args.images]))
    if args.from_dataset > 0:
        batches.append(dataset_images(cfg, args.from_dataset, size, args.dataset))
    out_dir = Path(args.out) if args.out else resolve_run_dir(args.run) / "attention"
    for images, names in batches:
        maps = attention_maps(encoder, images.to(args.device)).cpu()  # (B, heads, h, w)
        for img, m, name in zip(denormalize(images), maps, names):
            path = save_figure(img, m, out_dir / f"{name}_attention.png", title=name)
            print(path)
    return 0
