"""MAE reconstructions, like the figures of He et al. 2022 ("Masked Autoencoders Are Scalable Vision Learners").

One row per image: original | masked (what the encoder sees) | reconstruction | reconstruction with the
visible patches pasted back. The decoder is not part of ``encoder.safetensors``, so the whole objective
is rebuilt from the run's ``config.yaml`` and loaded from ``checkpoints/last.ckpt`` (key ``"objective"``).

With ``norm_pix_loss`` the decoder predicts per-patch standardised pixels; they are mapped back with each
patch's own mean and std taken from the original (as the official visualisation does), then the
ImageNet normalisation of the augmentation is undone for display.

CLI::

    sslkit viz reconstruct runs/mae_vit_tiny_fmnist-latest --num 8 --out recon.png

Library::

    mae, cfg = load_mae("runs/mae_vit_tiny_fmnist-latest")
    panels = reconstruction_panels(mae, images)      # (N, 4, C, H, W) in [0, 1]
    save_grid(panels, "recon.png")
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay out of `sslkit --help`
    import torch
    from omegaconf import DictConfig
    from torch import nn

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")
MASK_FILL = 0.5  # display value (grey) of the patches hidden from the encoder
INCHES_PER_PANEL = 1.6  # figure size per image panel
DPI = 150


def load_mae(run_dir: str | os.PathLike, map_location: str = "cpu") -> tuple[nn.Module, DictConfig]:
    """Rebuild a run's objective (encoder + decoder) from ``config.yaml`` and ``checkpoints/last.ckpt``, through the
    objective registry; it must reconstruct images (``reconstruct`` and ``pixel_mask``, as MAE does)."""
    from omegaconf import OmegaConf

    from sslkit.plugins import load_all
    from sslkit.registry import OBJECTIVES
    from sslkit.run import RunError, build_encoder, load_config, load_state_strict, resolve_run_dir

    d = resolve_run_dir(run_dir)
    cfg = load_config(d)
    load_all()
    entry = OBJECTIVES.get(cfg.objective.name)
    if not (hasattr(entry.factory, "reconstruct") and hasattr(entry.factory, "pixel_mask")):
        raise RunError(f"{d} was trained with objective {cfg.objective.name!r}, which does not reconstruct images; "
                       "reconstructions need an MAE run.")
    ckpt_path = d / "checkpoints" / "last.ckpt"
    if not ckpt_path.is_file():
        raise RunError(f"{d} has no checkpoints/last.ckpt: the decoder is only saved in training checkpoints. "
                       "Train (or resume) the run until it writes one.")
    from sslkit.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)  # weights_only; refuses files that are not sslkit training checkpoints
    if "sharded" in ckpt:  # trainer.strategy=fsdp: the weights are in the distributed checkpoint it names
        from sslkit.engine.fsdp import read_full_state

        ckpt["objective"] = read_full_state(ckpt["sharded"])["objective"]
    mae_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(entry.config), cfg.objective))
    mae = entry.factory(encoder=build_encoder(cfg), cfg=mae_cfg)
    load_state_strict(mae, ckpt["objective"], str(ckpt_path))
    return mae.to(map_location).eval(), cfg


def _denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, C, H, W) normalised -> display values clamped to [0, 1]; grayscale if C is not 3."""
    import torch

    if x.shape[1] == len(mean):
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = x * s + m
    return x.clamp(0, 1)


def reconstruction_panels(mae: nn.Module, images: torch.Tensor, mask_ratio: float | None = None,
                          mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                          seed: int | None = 0) -> torch.Tensor:
    """The four panels of each image, ready to display.

    Args:
        mae: a (trained) MAE objective.
        images: (N, C, H, W) normalised like the training views (H, W multiples of the patch size).
        mask_ratio: defaults to the objective's.
        mean, std: the normalisation to undo for display (default: ImageNet's, as in the augmentation).
        seed: seeds the masks without touching the caller's RNG stream; None uses the global RNG.

    Returns:
        (N, 4, C, H, W) in [0, 1]: original, masked, reconstruction, reconstruction + visible.
    """
    import torch

    from sslkit.augment.base import IMAGENET_MEAN, IMAGENET_STD

    mean = IMAGENET_MEAN if mean is None else mean
    std = IMAGENET_STD if std is None else std
    images = images.float()
    with torch.random.fork_rng(devices=[] if images.device.type == "cpu" else [images.device]):
        if seed is not None:
            torch.manual_seed(seed)
        recon, mask = mae.reconstruct(images, mask_ratio)  # (N, C, H, W), (N, L)
    pixel_mask = mae.pixel_mask(mask, images)  # (N, 1, H, W): 1 where the pixel belongs to a masked patch
    original = _denormalize(images, mean, std)  # (N, C, H, W)
    masked = original * (1 - pixel_mask) + MASK_FILL * pixel_mask
    reconstruction = _denormalize(recon, mean, std)
    pasted = original * (1 - pixel_mask) + reconstruction * pixel_mask
    return torch.stack([original, masked, reconstruction, pasted], dim=1)  # (N, 4, C, H, W)


def save_grid(panels: torch.Tensor, path: str | os.PathLike, titles: Sequence[str] = COLUMNS) -> Path:
    """Write (N, 4, C, H, W) panels in [0, 1] as a PNG: one row per image, one titled column per panel."""
    from matplotlib.figure import Figure

    n, cols = panels.shape[:2]
    fig = Figure(figsize=(INCHES_PER_PANEL * cols, INCHES_PER_PANEL * n), layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        for j in range(cols):
            img = panels[i, j].detach().cpu()
            ax = axes[i][j]
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
    from sslkit.run import save_figure_png

    return save_figure_png(fig, Path(path), DPI)


def sample_images(cfg: DictConfig, split: str, num: int, seed: int) -> torch.Tensor:
    """``num`` evaluation-transformed images (N, 3, s, s) from the run's dataset, chosen with ``seed``."""
    import torch

    from sslkit.augment.base import eval_transform
    from sslkit.run import build_dataset, eval_image_size

    ds = build_dataset(cfg, split)
    size = int(cfg.augment.get("image_size") or eval_image_size(cfg))
    tf = eval_transform(size)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:num]
    return torch.stack([tf(ds[int(i)][0]) for i in idx])


def reconstruct_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, num: int = 8,
                    split: str | None = None, seed: int = 0, mask_ratio: float | None = None,
                    device: str = "cpu") -> Path:
    """Reconstruct ``num`` images of a run's dataset and write the grid; returns the PNG path."""
    from sslkit.run import resolve_run_dir

    mae, cfg = load_mae(run_dir, device)
    images = sample_images(cfg, split or cfg.data.get("eval_split", "test"), num, seed).to(device)
    panels = reconstruction_panels(mae, images, mask_ratio, seed=seed)
    return save_grid(panels, out or resolve_run_dir(run_dir) / "reconstructions.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="an MAE run directory (or its -latest link)")
    parser.add_argument("--num", type=_positive_int, default=8, help="number of images (rows)")
    parser.add_argument("--out", default=None, help="output PNG (default: RUN/reconstructions.png)")
    parser.add_argument("--split", default=None, choices=["train", "test"],
                        help="dataset split to draw images from (default: the recipe's data.eval_split)")
    parser.add_argument("--seed", type=int, default=0, help="chooses the images and the masks")
    parser.add_argument("--mask-ratio", type=_ratio, default=None,
                        help="fraction of patches to hide (default: the run's objective.mask_ratio)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    out = reconstruct_run(args.run, args.out, args.num, args.split, args.seed, args.mask_ratio, args.device)
    print(f"wrote {out}")
    return 0
