"""DINOv2-style PCA maps of patch features (Oquab et al. 2023, fig. 1): ``sslkit viz pca RUN``.

For a set of images, the patch tokens of all of them are projected on their first principal component; its
thresholded sign separates foreground from background (the side holding fewer patches is taken as the
foreground, since objects usually cover less of an image than their background). A second PCA, fitted on the
foreground patches only, gives 3 components shown as RGB: patches of the same kind of part get the same colour
across images. ViTs show their CLS attention beside it; CNNs give their last feature map as the patch grid.

Example::

    sslkit viz pca runs/dino_vit_tiny_fmnist-latest --from-dataset 8        # -> RUN/pca/pca.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sslkit.viz import save_panel_grid


@torch.no_grad()
def pca_views(encoder, images: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: ANN001 - an sslkit Encoder
    """Patch PCA of ``images`` (B, 3, H, W): ``rgb`` (B, h, w, 3), ``foreground`` (B, h, w) and, for ViTs,
    ``attention`` (B, h, w), the mean over heads of the last block's CLS attention."""
    from sslkit.viz.dense import pca_patch_maps

    tokens = encoder.forward_tokens(images)
    grid = encoder.patch_grid(*images.shape[-2:])
    rgb, fg = pca_patch_maps(tokens.patches.float().cpu(), grid)
    if fg.float().mean() > 0.5:  # the first component's sign is arbitrary: the smaller side is the object
        rgb, fg = pca_patch_maps(tokens.patches.float().cpu(), grid, foreground=~fg.reshape(fg.shape[0], -1))
    out = {"rgb": rgb, "foreground": fg}
    if getattr(encoder, "is_vit", False):
        from sslkit.viz.attention import attention_maps

        out["attention"] = attention_maps(encoder, images).mean(dim=1).cpu()
    return out


def save_pca_grid(images: torch.Tensor, views: dict[str, torch.Tensor], names: list[str], path: Path) -> Path:
    """One row per image: the image, its PCA colours, its CLS attention (ViTs) and the foreground mask."""
    cols = ["image", "PCA of patches", *(["CLS attention"] if "attention" in views else []), "foreground"]
    rows = []
    for i, img in enumerate(images):
        panels = [img.permute(1, 2, 0), views["rgb"][i], *([views["attention"][i]] if "attention" in views else []),
                  views["foreground"][i].float()]
        rows.append([p.numpy() for p in panels])
    return save_panel_grid(rows, cols, names, path, cmap="inferno", interpolation="nearest")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sslkit.viz.attention import add_image_arguments

    add_image_arguments(parser, "output PNG (default: RUN/pca/pca.png)")


def run(args: argparse.Namespace) -> int:
    """``sslkit viz pca RUN [IMAGE ...] [--from-dataset N] [--out PNG]``: one PNG, one row per image."""
    from sslkit.cli import CLIError
    from sslkit.run import eval_image_size, load_encoder, resolve_run_dir
    from sslkit.viz.attention import dataset_images, denormalize, load_image_files

    if not args.images and args.from_dataset <= 0:
        raise CLIError("give image files and/or --from-dataset N")
    encoder, cfg = load_encoder(args.run, map_location="cpu")
    encoder = encoder.to(args.device).eval()
    size = args.image_size or eval_image_size(cfg)
    parts, names = [], []
    if args.images:
        parts.append(load_image_files(args.images, size))
        names += [Path(p).stem for p in args.images]
    if args.from_dataset > 0:
        imgs, ds_names = dataset_images(cfg, args.from_dataset, size, args.dataset)
        parts.append(imgs)
        names += ds_names
    images = torch.cat(parts)
    views = pca_views(encoder, images.to(args.device))
    out = Path(args.out) if args.out else resolve_run_dir(args.run) / "pca" / "pca.png"
    print(save_pca_grid(denormalize(images), views, names, out))
    return 0
