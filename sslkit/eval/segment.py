"""Linear segmentation probe on frozen patch features: ``sslkit eval segment RUN``.

The head follows DINOv3's linear segmentation probe (Simeoni et al. 2025; DINOv2, Oquab et al. 2023, Sec. 7.4):
the encoder is frozen, every patch token goes through ``BatchNorm2d -> 1x1 convolution`` (a linear layer per
patch), the class logits are upsampled bilinearly to the pixels and trained with cross-entropy, pixels equal to
``ignore_index`` left out. The score is the mean intersection-over-union over classes, from one confusion matrix
over all test pixels (classes absent from both the prediction and the ground truth are not scored), and the
pixel accuracy.

Patch features come from ``encoder.forward_tokens(x).patches`` laid out on ``encoder.patch_grid(H, W)``: ViT patch
tokens, or the last feature map of a CNN. Baselines: ``pixels`` gives each patch its own raw pixels as the feature
(on the grid of the run's encoder) and ``random`` a randomly initialised encoder of the run's architecture.

Data: ``fmnist_scenes`` (default) or any dataset with ``mask(i)``, for instance ``segmentation_folder`` (a user's
``images/`` + ``masks/``), or a folder path given as the dataset; ``--dataset-arg key=value`` (repeatable,
values read as YAML scalars: :func:`sslkit.eval.sources.parse_dataset_args`, as for every ``sslkit eval`` verb)
passes arguments to it. Images and masks get the evaluation view's geometry (resize the short side, centre-crop;
masks by nearest neighbour).

Example::

    res = run_segment("runs/dino_vit_tiny_fmnist-latest", dataset="fmnist_scenes", train_subset=2000)
    res["metrics"]["miou"], res["metrics"]["pixel_accuracy"]  # %
"""

from __future__ import annotations

import argparse
import datetime as _dt
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslkit.augment.base import IMAGENET_MEAN, IMAGENET_STD
from sslkit.encoders import Tokens
from sslkit.eval.features import _autocast, _inference_mode, default_device, eval_crop_ratio
from sslkit.eval.report import EvalError

DEFAULT_DATASET = "fmnist_scenes"
DEFAULT_IGNORE_INDEX = 255
DEFAULT_EPOCHS = 10
DEFAULT_LR = 1e-3  # AdamW on BN-standardised patch features
DEFAULT_WEIGHT_DECAY = 1e-4
DEFAULT_HEAD_BATCH = 32  # images per step of the head (each gives H x W pixel losses)
DEFAULT_TRAIN_IMAGES = 2000  # a fixed random subset: patch features of every train image are held in memory
DEFAULT_TEST_IMAGES = 500
PLOT_IMAGES = 6
PANEL_INCHES = 1.5
IGNORE_COLOR = (0.0, 0.0, 0.0)
BASELINES = ("none", "pixels", "random")


# ----------------------------------------------------------------------------------------------------------
# Images, masks and patch features
# ----------------------------------------------------------------------------------------------------------


def eval_geometry(x: torch.Tensor, image_size: int, mode: str = "bilinear") -> torch.Tensor:
    """The evaluation view's geometry (resize the short side, centre-crop ``image_size``) of ``(B, C, H, W)``.

    ``mode="bilinear"`` (antialiased) for images, ``"nearest"`` for label maps, so both stay aligned.
    """
    h, w = x.shape[-2:]
    short = int(round(image_size / eval_crop_ratio(image_size)))
    if min(h, w) != short:
        new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        if mode == "nearest":
            x = F.interpolate(x, size=(new_h, new_w), mode="nearest-exact")
        else:
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        h, w = new_h, new_w
    top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))
    return x[..., top:top + image_size, left:left + image_size]


def load_pairs(ds: Any, indices: Sequence[int], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Items ``indices`` of a dataset with masks -> uint8 images ``(N, 3, S, S)`` and long masks ``(N, S, S)``."""
    if not callable(getattr(ds, "mask", None)):
        raise EvalError(f"dataset {getattr(ds, 'source', type(ds).__name__)} has no masks; the segmentation probe "
                           "needs one that does: --dataset fmnist_scenes, or a folder with images/ and masks/.")
    images, masks = [], []
    for i in indices:
        img, m = ds[int(i)][0], ds.mask(int(i))
        if img.shape[-2:] != m.shape[-2:]:
            raise EvalError(f"item {i} of {getattr(ds, 'source', '')}: image {tuple(img.shape[-2:])} and mask "
                               f"{tuple(m.shape)} differ in size")
        images.append(eval_geometry(img[None].float(), image_size)[0].round().clamp(0, 255).byte())
        masks.append(eval_geometry(m[None, None].float(), image_size, mode="nearest")[0, 0].long())
    return torch.stack(images), torch.stack(masks)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float, normalised with the ImageNet mean / std (the encoders' input)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class PatchPixels(nn.Module):
    """The pixels baseline: each patch's raw pixels (in [0, 1], zero-padded at the border) as its feature.

    ``grid`` (h, w) is the patch grid to match (the run encoder's at this image size); a patch is
    ``ceil(S / h)`` pixels square. ``forward_tokens(x) -> Tokens`` with ``patches`` ``(B, h*w, 3 * p * p)``.
    """

    is_vit = False

    def __init__(self, grid: tuple[int, int], image_size: int) -> None:
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.patch = max(-(-image_size // self.grid[0]), -(-image_size // self.grid[1]))
        self.dim = 3 * self.patch * self.patch
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def patch_grid(self, height: int, width: int | None = None) -> tuple[int, int]:
        return self.grid

    def forward_tokens(self, x: torch.Tensor) -> Tokens:
        p, (h, w) = self.patch, self.grid
        pixels = x * self.std + self.mean  # (B, 3, S, S) in [0, 1]
        pixels = F.pad(pixels, (0, w * p - x.shape[-1], 0, h * p - x.shape[-2]))  # (B, 3, h*p, w*p)
        patches = F.unfold(pixels, kernel_size=p, stride=p).transpose(1, 2)  # (B, h*w, 3*p*p)
        return Tokens(patches.mean(1), patches[:, :0], patches)


@torch.no_grad()
def patch_features(encoder: nn.Module, images: torch.Tensor, *, batch_size: int = 64,
                   device: str | torch.device | None = None, bf16: bool | None = None,
                   progress: bool = True, desc: str = "patch features") -> torch.Tensor:
    """Frozen patch features of uint8 images ``(N, 3, S, S)`` -> ``(N, D, h, w)`` float32 on the CPU."""
    from tqdm.auto import tqdm

    dev = default_device(device)
    encoder.to(dev)
    h, w = encoder.patch_grid(*images.shape[-2:])
    out = []
    with _inference_mode(encoder), _autocast(dev, bf16):
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress):
            x = normalize(images[start:start + batch_size].to(dev))
            patches = encoder.forward_tokens(x).patches  # (B, N, D)
            if patches.shape[1] != h * w:
                raise EvalError(f"the encoder gave {patches.shape[1]} patch tokens for a {h}x{w} grid; use an "
                                   f"image size that is a multiple of its patch size {encoder.feature_stride}")
            out.append(patches.float().transpose(1, 2).reshape(len(x), -1, h, w).cpu())  # (B, D, h, w)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------
# The probe and its metrics
# ----------------------------------------------------------------------------------------------------------


class LinearSegmentationHead(nn.Module):
    """``BatchNorm2d -> Conv2d 1x1`` on a patch grid, logits upsampled bilinearly to the pixels."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``(B, D, h, w)`` -> logits ``(B, C, H, W)``."""
        logits = self.classifier(self.bn(feats))  # (B, C, h, w)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def fit_segmentation_probe(feats: torch.Tensor, masks: torch.Tensor, num_classes: int, *,
                           ignore_index: int = DEFAULT_IGNORE_INDEX, epochs: int = DEFAULT_EPOCHS,
                           lr: float = DEFAULT_LR, weight_decay: float = DEFAULT_WEIGHT_DECAY,
                           batch_size: int = DEFAULT_HEAD_BATCH, seed: int = 0,
                           device: str | torch.device | None = None, progress: bool = True) -> LinearSegmentationHead:
    """Train the linear head on frozen features ``(N, D, h, w)`` against masks ``(N, H, W)`` (AdamW, cosine)."""
    from sslkit.engine.schedules import cosine_schedule

    if epochs <= 0 or lr <= 0 or batch_size <= 0:
        raise EvalError(f"epochs, lr and batch size must be positive, got {epochs}, {lr}, {batch_size}")
    dev = default_device(device)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LinearSegmentationHead(feats.shape[1], num_classes).to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    n, size = len(feats), tuple(masks.shape[-2:])
    steps = epochs * -(-n // batch_size)
    lrs = cosine_schedule(lr, 0.0, steps)
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc="segmentation probe", unit="step", disable=not progress)
    step = 0
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch_size):
            target = masks[idx].to(dev)  # (B, H, W)
            for group in opt.param_groups:
                group["lr"] = float(lrs[step])
            step += 1
            bar.update(1)
            if len(idx) < 2 or not (target != ignore_index).any():  # BatchNorm needs 2; nothing to learn
                continue
            loss = F.cross_entropy(head(feats[idx].to(dev), size), target, ignore_index=ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return head.eval()


@torch.no_grad()
def predict(head: LinearSegmentationHead, feats: torch.Tensor, size: tuple[int, int], batch_size: int = 64,
            device: str | torch.device | None = None) -> torch.Tensor:
    """Predicted label maps ``(N, H, W)`` long of features ``(N, D, h, w)``."""
    dev = default_device(device)
    head.to(dev).eval()
    return torch.cat([head(f.to(dev), size).argmax(1).cpu() for f in feats.split(batch_size)])


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = DEFAULT_IGNORE_INDEX) -> torch.Tensor:
    """``(C, C)`` int64 counts, rows = ground truth, columns = prediction, over pixels not ``ignore_index``."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    bad = (t < 0) | (t >= num_classes)
    if bad.any():
        raise EvalError(f"mask value {int(t[bad][0])} is not a class (0..{num_classes - 1}) nor the ignore index "
                           f"{ignore_index}; set --ignore-index to the value of unlabelled pixels")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU and pixel accuracy (%) of a confusion matrix (rows = truth).

    IoU of class c = TP / (TP + FP + FN); a class absent from both the ground truth and the prediction (a zero
    denominator) is not scored and not averaged. Returns ``{"miou", "pixel_accuracy", "iou": {name: % or None},
    "classes_scored", "pixels"}``.
    """
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp  # TP + FP + FN
    scored = union > 0
    iou = torch.where(scored, tp / union.clamp(min=1), torch.zeros_like(tp))
    names = list(class_names or []) + [str(c) for c in range(len(class_names or []), len(conf))]
    total = conf.sum()
    return {"miou": 100.0 * float(iou[scored].mean()) if scored.any() else 0.0,
            "pixel_accuracy": 100.0 * float(tp.sum() / total) if total > 0 else 0.0,
            "iou": {names[c]: (100.0 * float(iou[c]) if scored[c] else None) for c in range(len(conf))},
            "classes_scored": int(scored.sum()), "pixels": int(total)}


# ----------------------------------------------------------------------------------------------------------
# A run on a dataset
# ----------------------------------------------------------------------------------------------------------


def build_segmentation_dataset(dataset: str, split: str, root: str | None = None,
                               args: dict[str, Any] | None = None) -> Any:
    """A registered dataset name (with ``root`` and arguments), or a folder path (``segmentation_folder``)."""
    from sslkit.plugins import load_all
    from sslkit.registry import DATASETS

    load_all()
    kw = dict(args or {})
    if Path(dataset).expanduser().is_dir():
        return DATASETS.build("segmentation_folder", split=split, root=str(Path(dataset).expanduser()), **kw)
    if root is not None:
        kw["root"] = root
    return DATASETS.build(dataset, split=split, **kw)


def _subset(n: int, limit: int | None, seed: int) -> list[int]:
    if limit is not None and limit <= 0:
        raise EvalError(f"subset sizes must be positive, got {limit}")
    if limit is None or limit >= n:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values.tolist()


def _encoder_for(baseline: str, run_dir: Path, cfg: Any, image_size: int, seed: int) -> tuple[nn.Module, str]:
    from sslkit.run import build_encoder, load_encoder

    if baseline == "none":
        return load_encoder(run_dir)[0], f"{cfg.encoder.name} (pretrained, {run_dir.name})"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = build_encoder(cfg, for_eval=True).eval()
    if baseline == "random":
        return enc, f"{cfg.encoder.name} (random init, seed {seed})"
    grid = enc.patch_grid(image_size, image_size)
    pix = PatchPixels(grid, image_size)
    return pix, f"raw pixels per patch ({pix.patch}x{pix.patch} px on the {grid[0]}x{grid[1]} grid of {cfg.encoder.name})"


def _num_classes(ds: Any, masks: Sequence[torch.Tensor], ignore_index: int) -> int:
    seen = max(int(m[m != ignore_index].max()) if (m != ignore_index).any() else 0 for m in masks) + 1
    return max(len(getattr(ds, "classes", None) or []), seen)


def run_segment(run_dir: str | Path, *, dataset: str = DEFAULT_DATASET, data_root: str | None = None,
                dataset_args: Any = None, data_args: Any = None, baseline: str = "none",
                ignore_index: int = DEFAULT_IGNORE_INDEX, epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR,
                weight_decay: float = DEFAULT_WEIGHT_DECAY, head_batch_size: int = DEFAULT_HEAD_BATCH,
                train_subset: int | None = DEFAULT_TRAIN_IMAGES, test_subset: int | None = DEFAULT_TEST_IMAGES,
                image_size: int | None = None, device: str | None = None, batch_size: int | None = None,
                seed: int = 0, bf16: bool | None = None, progress: bool = True, plots: bool = True) -> dict:
    """Linear segmentation probe of a run's frozen patch features (or a baseline) on a dataset with masks.

    Writes ``<run>/eval/segment[_<baseline>]/results.json``, a row of ``<run>/eval/report.md`` and
    ``examples.png`` (image / ground truth / prediction). ``image_size`` defaults to the dataset's own size for
    fixed-size datasets (``fmnist_scenes``: 64), else the run's evaluation size. ``dataset_args``: the dataset's
    arguments, a dict or ``key=value`` strings (``--dataset-arg``); ``data_args`` is its older name.
    """
    from sslkit.eval.report import append_report_row, eval_dir, write_results
    from sslkit.eval.sources import parse_dataset_args
    from sslkit.run import eval_image_size, load_config, resolve_run_dir

    t0 = time.perf_counter()
    data_args = {**parse_dataset_args(data_args), **parse_dataset_args(dataset_args)}
    if baseline not in BASELINES:
        raise EvalError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    if not 0 <= ignore_index <= 255:
        raise EvalError(f"--ignore-index must be in 0..255 (masks are 8-bit PNGs), got {ignore_index}")
    rd = resolve_run_dir(run_dir)
    cfg = load_config(rd)
    dev = default_device(device)
    train_ds = build_segmentation_dataset(dataset, "train", data_root, data_args)
    test_ds = build_segmentation_dataset(dataset, "test", data_root, data_args)
    if image_size is None:
        fixed = getattr(train_ds, "images", None)
        image_size = int(fixed.shape[-1]) if isinstance(fixed, torch.Tensor) else eval_image_size(cfg)
    train_img, train_mask = load_pairs(train_ds, _subset(len(train_ds), train_subset, seed), image_size)
    test_img, test_mask = load_pairs(test_ds, _subset(len(test_ds), test_subset, seed), image_size)
    num_classes = _num_classes(train_ds, [train_mask, test_mask], ignore_index)
    encoder, source = _encoder_for(baseline, rd, cfg, image_size, seed)
    bs = int(batch_size or cfg.get("eval", {}).get("batch_size") or 256)
    feat_kw = {"batch_size": bs, "device": dev, "bf16": bf16, "progress": progress}
    t_feat = time.perf_counter()
    train_f = patch_features(encoder, train_img, desc="train patch features", **feat_kw)
    test_f = patch_features(encoder, test_img, desc="test patch features", **feat_kw)
    t_feat = time.perf_counter() - t_feat
    t_eval = time.perf_counter()
    head = fit_segmentation_probe(train_f, train_mask, num_classes, ignore_index=ignore_index, epochs=epochs, lr=lr,
                                  weight_decay=weight_decay, batch_size=head_batch_size, seed=seed, device=dev,
                                  progress=progress)
    size = (image_size, image_size)
    pred = predict(head, test_f, size, device=dev)
    classes = list(getattr(train_ds, "classes", None) or [])
    metrics = segmentation_metrics(confusion_matrix(pred, test_mask, num_classes, ignore_index), classes)
    train_pred = predict(head, train_f, size, device=dev)
    metrics["train_miou"] = segmentation_metrics(confusion_matrix(train_pred, train_mask, num_classes,
                                                                  ignore_index))["miou"]
    t_eval = time.perf_counter() - t_eval
    out = eval_dir(rd, "segment", baseline)
    pics = []
    if plots:
        k = min(PLOT_IMAGES, len(test_img))
        pics.append(save_examples(test_img[:k], test_mask[:k], pred[:k], num_classes, ignore_index,
                                  out / "examples.png", title=f"{source}: mIoU {metrics['miou']:.1f}"))
    total = time.perf_counter() - t0
    payload = {
        "kind": "segment", "baseline": baseline, "run_dir": str(rd), "recipe": str(cfg.get("name", "")),
        "created": _dt.datetime.now().isoformat(timespec="seconds"), "metrics": metrics,
        "settings": {"dataset": dataset, "data_root": data_root, "data_args": data_args or {},
                     "train_images": len(train_img), "test_images": len(test_img), "image_size": image_size,
                     "patch_grid": list(test_f.shape[-2:]), "feature_dim": int(test_f.shape[1]),
                     "num_classes": num_classes, "ignore_index": ignore_index, "epochs": epochs, "lr": lr,
                     "weight_decay": weight_decay, "head_batch_size": head_batch_size,
                     "head": "BatchNorm2d + 1x1 conv, bilinear upsampling", "optimizer": "adamw, cosine",
                     "device": str(dev), "seed": seed},
        "features": {"source": source, "encoder": str(cfg.encoder.name), "train": getattr(train_ds, "source", ""),
                     "test": getattr(test_ds, "source", "")},
        "seconds": {"features": round(t_feat, 3), "eval": round(t_eval, 3), "total": round(total, 3)},
        "plots": [str(p.relative_to(rd)) for p in pics],
    }
    path = write_results(out / "results.json", payload)
    append_report_row(rd / "eval" / "report.md", [
        payload["created"].replace("T", " "), "segment", baseline if baseline != "none" else "encoder",
        f"{dataset} {len(test_img)} / {len(train_img)}",
        f"mIoU {metrics['miou']:.2f}, pixel acc {metrics['pixel_accuracy']:.2f} ({num_classes} classes)",
        f"{total:.1f} s", f"[results]({path.relative_to(rd / 'eval')})"])
    return {**payload, "results_path": str(path)}


def label_colors(num_classes: int, ignore_index: int) -> Any:
    """A colour per class (tab20; 0 = background is dark grey) and black for ``ignore_index``, as a colormap."""
    import matplotlib

    tab = matplotlib.colormaps["tab20"]
    colors = [(0.25, 0.25, 0.25)] + [tab(c % 20)[:3] for c in range(max(0, num_classes - 1))]
    colors += [IGNORE_COLOR] * (256 - len(colors))
    colors[ignore_index] = IGNORE_COLOR
    return matplotlib.colors.ListedColormap(colors)


def save_examples(images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor, num_classes: int,
                  ignore_index: int, path: Path, title: str = "") -> Path:
    """One row per image: the image, its ground truth and the probe's prediction (same colours; black = ignored)."""
    from sslkit.eval.plots import _plt, _save, _to_hwc

    plt = _plt()
    cmap = label_colors(num_classes, ignore_index)
    cols = ("image", "ground truth", "prediction")
    fig, axes = plt.subplots(len(images), 3, squeeze=False, figsize=(3 * PANEL_INCHES, PANEL_INCHES * len(images)))
    for i in range(len(images)):
        panels = [_to_hwc(images[i]), masks[i].numpy(), preds[i].numpy()]
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            kw = {} if j == 0 else {"cmap": cmap, "vmin": 0, "vmax": 255}
            ax.imshow(panel, interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT",
                   help="run directory, its -latest link, or a file inside it (checkpoint, encoder.safetensors)")
    p.add_argument("--dataset", default=DEFAULT_DATASET,
                   help="a registered dataset with masks (fmnist_scenes, segmentation_folder) or a folder holding "
                        "images/ and masks/ (or train/ and test/ with those)")
    p.add_argument("--data-root", default=None, help="root of a registered dataset (segmentation_folder's folder)")
    p.add_argument("--dataset-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="an argument of the dataset, repeatable (e.g. --dataset-arg num_images=3000)")
    # the older spelling, still read (into the same list) but no longer shown
    p.add_argument("--data-arg", dest="dataset_arg", action="append", help=argparse.SUPPRESS)
    p.add_argument("--ignore-index", type=int, default=DEFAULT_IGNORE_INDEX,
                   help="mask value of unlabelled pixels, left out of training and scoring")
    p.add_argument("--baseline", choices=("none", "pixels", "random", "all"), default="none",
                   help="the run's encoder (none), raw pixels per patch, a random encoder, or all three side by side")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side (default: the dataset's own size for fmnist_scenes, else the run's eval size); "
                        "larger inputs give finer patch grids")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="passes of the head over the train images")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="AdamW peak learning rate (cosine to 0)")
    p.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY, help="AdamW weight decay")
    p.add_argument("--head-batch-size", type=int, default=DEFAULT_HEAD_BATCH, help="images per head step")
    p.add_argument("--train-subset", type=int, default=DEFAULT_TRAIN_IMAGES, metavar="N",
                   help="fixed random N train images (their patch features are held in memory)")
    p.add_argument("--test-subset", type=int, default=DEFAULT_TEST_IMAGES, metavar="N", help="fixed random N test images")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=None, help="feature-extraction batch (default: eval.batch_size)")
    p.add_argument("--seed", type=int, default=0, help="subsets, random-encoder weights, head initialisation")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for feature extraction also on CPU")
    p.add_argument("--no-plots", action="store_true", help="skip examples.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """``sslkit eval segment RUN [--dataset fmnist_scenes] [--baseline all]``: a table and ``results.json`` paths."""
    import sys

    from sslkit.data.base import DataError
    from sslkit.eval.cli import flatten_metrics, format_table
    from sslkit.eval.sources import parse_dataset_args
    from sslkit.registry import RegistryError, error_line
    from sslkit.run import RunError

    baselines = list(BASELINES) if args.baseline == "all" else [args.baseline]
    columns: dict[str, dict[str, Any]] = {}
    paths = []
    try:
        for b in baselines:
            res = run_segment(args.run, dataset=args.dataset, data_root=args.data_root,
                              dataset_args=parse_dataset_args(args.dataset_arg),
                              baseline=b, ignore_index=args.ignore_index, epochs=args.epochs, lr=args.lr,
                              weight_decay=args.weight_decay, head_batch_size=args.head_batch_size,
                              train_subset=args.train_subset, test_subset=args.test_subset,
                              image_size=args.image_size, device=args.device, batch_size=args.batch_size,
                              seed=args.seed, bf16=True if args.bf16 else None, progress=not args.no_progress,
                              plots=not args.no_plots)
            m = res["metrics"]
            columns["encoder" if b == "none" else b] = flatten_metrics(
                {"miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "train_miou": m["train_miou"],
                 "iou": m["iou"]})
            paths.append(res["results_path"])
    except (EvalError, DataError, RunError, RegistryError) as e:
        print(f"sslkit: error: {error_line(e)}", file=sys.stderr)
        return 2
    print(format_table(columns))
    for p in paths:
        print(f"results: {p}")
    return 0
