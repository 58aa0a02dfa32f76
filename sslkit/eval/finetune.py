"""End-to-end fine-tuning of a pretrained encoder with a linear head: ``sslkit eval finetune RUN``.

* ViTs follow the MAE / BEiT fine-tuning protocol (He et al. 2022, Sec. A.3; Bao et al. 2022): AdamW with
  layer-wise learning-rate decay (block ``i`` of ``L`` gets ``lr * decay ** (L + 1 - (i + 1))``, the embeddings
  ``lr * decay ** (L + 1)``, the final norm and the head ``lr``: :func:`vit_layer_id`), drop path,
  label smoothing, linear warmup then a cosine schedule, random resized crops and flips.
* CNNs take a plain recipe: AdamW without layer decay, the same schedule, label smoothing and augmentation.

The fine-tuned top-1 is reported next to the linear probe of the same encoder on the same labels
(:func:`sslkit.eval.report.run_linear`), so the table shows what unfreezing adds. ``label_fraction`` trains on a
fixed class-balanced share of the train labels (:func:`sslkit.eval.linear.balanced_subset`; SimCLR's 1% / 10%).
A checkpoint is written atomically after every epoch; ``resume=True`` continues from it with the same result as
an uninterrupted run on CPU.

The dataset is chosen as for every ``sslkit eval`` verb (:mod:`sslkit.eval.sources`): by default the run's own,
else ``dataset`` (``--dataset NAME|PATH``: a registered dataset with ``dataset_args`` / ``--dataset-arg
key=value``, or an image folder with one sub-folder per class, split per class when it has no ``train/`` and
``test/`` sub-folders) with ``train_split`` / ``eval_split``. Results on another dataset (or other splits) go to
``RUN/transfer/<dataset>-<hash>/eval/finetune[_random]/``, beside the k-NN and linear results on that dataset,
and leave the run's own ``RUN/eval/`` alone; ``resume`` finds the checkpoint there.

Example::

    res = run_finetune("runs/simclr_resnet_fmnist-latest", epochs=5, label_fraction=0.1)
    res["metrics"]["top1"], res["metrics"]["linear_top1"]
    run_finetune("runs/simclr_resnet_fmnist-latest", dataset="photos/", epochs=5)  # an image folder
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

from sslkit.data.base import TensorImageDataset
from sslkit.eval.features import _autocast, default_device, extract_features
from sslkit.eval.linear import balanced_subset, topk_accuracy, train_augmentation
from sslkit.eval.report import EvalError

# MAE's ViT-B recipe (base lr for batch 256, layer decay 0.65 / 0.75, drop path 0.1, smoothing 0.1, wd 0.05).
VIT_BASE_LR = 5e-4
VIT_LAYER_DECAY = 0.65
VIT_DROP_PATH = 0.1
CNN_BASE_LR = 1e-3
WEIGHT_DECAY = 0.05
LABEL_SMOOTHING = 0.1
WARMUP_EPOCHS = 1.0
MIN_LR = 1e-6
DEFAULT_EPOCHS = 10  # CPU-sized; MAE fine-tunes ViT-B for 100 epochs
DEFAULT_BATCH_SIZE = 128
LR_REFERENCE_BATCH = 256
CROP_SCALE = (0.08, 1.0)  # ImageNet's; a run's own pretraining crop range is the default when it has one
HEAD_INIT_STD = 2e-5  # MAE initialises the fine-tuning head near zero
CHECKPOINT_NAME = "last.ckpt"


class Classifier(nn.Module):
    """An encoder and a linear head: ``(B, 3, H, W) -> (B, C)`` logits."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.dim), num_classes)
        nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def vit_layer_id(name: str, num_layers: int) -> int:
    """MAE / BEiT layer of a timm ViT parameter: the embeddings (and mask token) 0, block ``i`` ``i + 1``, the rest
    (final norm) ``num_layers`` = depth + 1. (timm's ``param_groups_layer_decay`` puts the final norm in the last
    block's group and scales that block by 1, one step off this protocol for a model without a head.)"""
    if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups(model: Classifier, weight_decay: float, layer_decay: float | None) -> list[dict[str, Any]]:
    """Optimiser groups, each with an ``lr_scale``: layer-wise decay for ViTs (``layer_decay`` not None), one scale
    for the rest. No weight decay on biases, norms, the class / register tokens and the position embedding."""
    enc = model.encoder
    head = [{"params": [model.head.weight], "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": [model.head.bias], "weight_decay": 0.0, "lr_scale": 1.0}]
    if layer_decay is not None and getattr(enc, "is_vit", False):
        num_layers = len(enc.model.blocks) + 1
        no_wd = {f"model.{n}" for n in enc.model.no_weight_decay()} | {"mask_token"}
        groups: dict[tuple[int, bool], dict[str, Any]] = {}
        for name, p in enc.named_parameters():
            if not p.requires_grad:
                continue
            layer, decays = vit_layer_id(name.removeprefix("model."), num_layers), p.ndim > 1 and name not in no_wd
            g = groups.setdefault((layer, decays), {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                                    "lr_scale": layer_decay ** (num_layers - layer)})
            g["params"].append(p)
        return [*groups.values(), *head]
    decay = [p for p in enc.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in enc.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}, *head]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """This step's learning rate times each group's ``lr_scale``."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def take(ds: Any, indices: torch.Tensor) -> Any:
    """The items ``indices`` of a dataset (in memory for tensor datasets), keeping ``classes`` and ``labels``."""
    if isinstance(ds, TensorImageDataset):
        return TensorImageDataset(ds._images[indices], ds._labels[indices], ds.classes,
                                  f"{ds.source}[{len(indices)} balanced]")
    sub = torch.utils.data.Subset(ds, indices.tolist())
    sub.classes = getattr(ds, "classes", [])  # type: ignore[attr-defined]
    sub.labels = torch.as_tensor(ds.labels)[indices]  # type: ignore[attr-defined]
    return sub


def finetune(model: Classifier, train_ds: Any, test_ds: Any, *, image_size: int, epochs: int = DEFAULT_EPOCHS,
             batch_size: int = DEFAULT_BATCH_SIZE, base_lr: float = CNN_BASE_LR, weight_decay: float = WEIGHT_DECAY,
             layer_decay: float | None = None, label_smoothing: float = LABEL_SMOOTHING,
             warmup_epochs: float = WARMUP_EPOCHS, crop_scale: Sequence[float] = CROP_SCALE,
             device: str | torch.device | None = None, seed: int = 0, progress: bool = True,
             checkpoint: Path | None = None, resume: bool = False, settings: dict[str, Any] | None = None,
             stop_at_epoch: int | None = None) -> dict:
    """Fine-tune ``model`` (encoder and head) on augmented ``train_ds`` images; score top-1 / top-5 on ``test_ds``.

    lr = ``base_lr * batch_size / 256``, warmed up linearly for ``warmup_epochs`` then cosine to ``MIN_LR``; each
    group's lr is scaled by its ``lr_scale`` (:func:`param_groups`). ``checkpoint``: written after every epoch;
    with ``resume`` the run continues from it (its ``settings`` must equal these). ``stop_at_epoch``: checkpoint and
    return after that epoch without changing the schedule (as ``pretrain --stop-at-step``); no test score then.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from sslkit.engine.checkpoint import load_checkpoint, rng_state, set_rng_state, write_checkpoint
    from sslkit.engine.schedules import cosine_schedule
    from sslkit.eval.features import _Transformed
    from sslkit.run import RunError

    if epochs <= 0 or batch_size <= 0 or base_lr <= 0:
        raise EvalError(f"epochs, batch size and lr must be positive, got {epochs}, {batch_size}, {base_lr}")
    dev = default_device(device)
    model.to(dev)
    opt = torch.optim.AdamW(param_groups(model, weight_decay, layer_decay), lr=base_lr)
    data = _Transformed(train_ds, train_augmentation(image_size, crop_scale))
    steps_per_epoch = -(-len(data) // batch_size)
    lr = base_lr * batch_size / LR_REFERENCE_BATCH
    lrs = cosine_schedule(lr, MIN_LR, epochs * steps_per_epoch, int(round(warmup_epochs * steps_per_epoch)))
    settings = dict(settings or {})
    start, history = 0, []
    if resume:
        if checkpoint is None or not checkpoint.is_file():
            raise RunError(f"nothing to resume: {checkpoint} does not exist. Run without --resume to start.")
        ckpt = load_checkpoint(checkpoint)
        if ckpt.get("settings") != settings:
            diff = sorted(k for k in set(settings) | set(ckpt.get("settings", {}))
                          if settings.get(k) != ckpt.get("settings", {}).get(k))
            raise RunError(f"{checkpoint} was written with other fine-tuning settings ({', '.join(diff)}); resume "
                           "with the same options, or start again without --resume.")
        model.load_state_dict(ckpt["objective"]["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start, history = int(ckpt["epoch"]), list(ckpt.get("history", []))
        set_rng_state(ckpt["rng"])
    else:
        torch.manual_seed(seed)  # the augmentation's randomness
    t0 = time.perf_counter()
    bar = tqdm(total=epochs * steps_per_epoch, initial=start * steps_per_epoch, desc="fine-tune", unit="step",
               disable=not progress)
    for epoch in range(start, epochs):
        model.train()
        loader = DataLoader(data, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed + epoch))
        total, count = 0.0, 0
        for i, (images, y) in enumerate(loader):
            set_lr(opt, float(lrs[epoch * steps_per_epoch + i]))
            with _autocast(dev):
                loss = F.cross_entropy(model(images.to(dev)).float(), y.to(dev), label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(y), count + len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append({"epoch": epoch + 1, "train_loss": total / max(1, count)})
        if checkpoint is not None:
            write_checkpoint(checkpoint, {"objective": {"model": model.state_dict()}, "optimizer": opt.state_dict(),
                                          "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                                          "rng": rng_state(), "settings": settings, "history": history})
        if stop_at_epoch is not None and epoch + 1 >= stop_at_epoch:
            bar.close()
            return {"top1": None, "top5": None, "history": history, "peak_lr": lr, "steps": epochs * steps_per_epoch,
                    "seconds": time.perf_counter() - t0}
    bar.close()
    model.eval()
    feats, labels = extract_features(model.encoder, test_ds, image_size=image_size, device=dev, progress=progress,
                                     desc="test features (fine-tuned)")
    with torch.no_grad():
        logits = model.head(feats.to(dev)).cpu()
    top1, top5 = topk_accuracy(logits, labels)
    return {"top1": top1, "top5": top5, "history": history, "peak_lr": lr, "steps": epochs * steps_per_epoch,
            "seconds": time.perf_counter() - t0}


def _encoder(run_dir: Path, cfg: Any, baseline: str, drop_path: float, seed: int) -> nn.Module:
    """The run's eval encoder (or a random one), rebuilt with ``drop_path_rate`` when it is a ViT."""
    from sslkit.registry import ENCODERS
    from sslkit.run import build_encoder, encoder_kwargs, load_encoder, load_state_strict

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = load_encoder(run_dir)[0] if baseline == "none" else build_encoder(cfg, for_eval=True)
    if not getattr(enc, "is_vit", False) or drop_path <= 0:
        return enc
    kw = encoder_kwargs(cfg, for_eval=True)
    name = kw.pop("name")
    with_dp = ENCODERS.build(name, **{**kw, "drop_path_rate": drop_path})
    load_state_strict(with_dp, enc.state_dict(), f"the {name} weights (with drop path)")
    return with_dp


def run_crop_scale(cfg: Any) -> tuple[float, float]:
    """The crop range a run was pretrained with (``augment.crop_scale``, or multi-crop's ``global_scale``), else
    :data:`CROP_SCALE`: crops much smaller than the pretraining ones are images the encoder never saw, and at
    Fashion-MNIST's 28 px an 8% crop keeps about 8 x 8 pixels of a garment."""
    aug = cfg.get("augment") or {}
    for key in ("crop_scale", "global_scale"):
        value = aug.get(key)
        if value is not None:
            return float(value[0]), float(value[1])
    return CROP_SCALE


def check_crop_scale(scale: Sequence[float]) -> tuple[float, float]:
    if len(scale) != 2 or not 0 < float(scale[0]) <= float(scale[1]) <= 1:
        raise EvalError(f"--crop-scale must be two numbers MIN MAX with 0 < MIN <= MAX <= 1, got {list(scale)}; "
                        "e.g. --crop-scale 0.08 1 (ImageNet) or 0.5 1")
    return float(scale[0]), float(scale[1])


def run_finetune(run_dir: str | Path, *, baseline: str = "none", epochs: int = DEFAULT_EPOCHS,
                 batch_size: int = DEFAULT_BATCH_SIZE, base_lr: float | None = None,
                 weight_decay: float = WEIGHT_DECAY, layer_decay: float | None = VIT_LAYER_DECAY,
                 drop_path: float = VIT_DROP_PATH, label_smoothing: float = LABEL_SMOOTHING,
                 warmup_epochs: float = WARMUP_EPOCHS, label_fraction: float | None = None, linear: bool = True,
                 resume: bool = False, train_subset: int | None = None, test_subset: int | None = None,
                 device: str | None = None, seed: int = 0, progress: bool = True,
                 dataset: str | Path | None = None, dataset_args: Any = None, train_split: str | None = None,
                 eval_split: str | None = None, crop_scale: Sequence[float] | None = None) -> dict:
    """Fine-tune a run's encoder (``baseline="random"``: from scratch) and compare with its linear probe.

    ``crop_scale``: the (min, max) area of the random resized crops; default the run's pretraining range
    (:func:`run_crop_scale`), else ImageNet's (0.08, 1).

    Writes ``<run>/eval/finetune[_random]/results.json`` (``metrics``: ``top1``, ``top5``, ``linear_top1``,
    ``linear_top5``), its checkpoint, and a row of ``<run>/eval/report.md``. ``dataset`` / ``dataset_args`` /
    ``train_split`` / ``eval_split`` choose the data as for :func:`sslkit.eval.report.load_context` (default the
    run's own); on other data the same files go to ``<run>/transfer/<dataset>-<hash>/eval/``.
    """
    from sslkit.eval.report import append_report_row, eval_dir, load_context, run_linear, write_results

    t0 = time.perf_counter()
    if baseline not in ("none", "random"):
        raise EvalError(f"fine-tuning starts from the run's encoder (none) or a random one (random), got {baseline!r}")
    if label_fraction is not None and not 0 < label_fraction <= 1:
        raise EvalError(f"--label-fraction must be in (0, 1], e.g. 0.01 or 0.1; got {label_fraction}")
    data_opts = {"dataset": dataset, "dataset_args": dataset_args, "train_split": train_split,
                 "eval_split": eval_split}
    ctx = load_context(run_dir, baseline=baseline, device=device, train_subset=train_subset, test_subset=test_subset,
                       seed=seed, progress=progress, **data_opts)
    if ctx.feature_source is None or ctx.feature_source.kind != "run":
        raise EvalError(f"fine-tuning needs a run directory to start from, got {run_dir}; timm:, pixels and random: "
                        "sources are for the frozen-feature evaluations (knn, linear, retrieval).")
    src_run = Path(ctx.feature_source.name)  # ctx.run_dir is where results go: the run, or its transfer/ folder
    data = ctx.data
    train_ds, test_ds = ctx.dataset("train"), ctx.dataset(ctx.eval_split)
    labels = torch.as_tensor(train_ds.labels)
    if (labels < 0).any():
        raise EvalError(f"fine-tuning needs labels; {getattr(train_ds, 'source', 'the dataset')} has unlabelled images")
    if label_fraction is not None:
        train_ds = take(train_ds, balanced_subset(labels, label_fraction, seed))
    num_classes = max(len(getattr(train_ds, "classes", None) or []), int(labels.max()) + 1)
    encoder = _encoder(src_run, ctx.cfg, baseline, drop_path, seed)
    is_vit = bool(getattr(encoder, "is_vit", False))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(encoder, num_classes)
    base = base_lr if base_lr is not None else (VIT_BASE_LR if is_vit else CNN_BASE_LR)
    scale = check_crop_scale(crop_scale if crop_scale is not None else run_crop_scale(ctx.cfg))
    settings = {"epochs": epochs, "batch_size": batch_size, "base_lr": base, "weight_decay": weight_decay,
                "layer_decay": layer_decay if is_vit else None, "drop_path": drop_path if is_vit else 0.0,
                "label_smoothing": label_smoothing, "warmup_epochs": warmup_epochs, "label_fraction": label_fraction,
                "train_images": len(train_ds), "test_images": len(test_ds), "image_size": ctx.image_size,
                "crop_scale": list(scale), "optimizer": "adamw" + (", layer-wise lr decay" if is_vit else ""),
                "schedule": "linear warmup, cosine", "seed": seed, "train_subset": train_subset,
                "test_subset": test_subset}
    if ctx.run_dir != src_run and data is not None:  # other data: part of the settings a resume must match
        settings["dataset"] = data.describe()
    out = eval_dir(ctx.run_dir, "finetune", baseline)
    res = finetune(model, train_ds, test_ds, image_size=ctx.image_size, epochs=epochs, batch_size=batch_size,
                   base_lr=base, weight_decay=weight_decay, layer_decay=layer_decay if is_vit else None,
                   label_smoothing=label_smoothing, warmup_epochs=warmup_epochs, crop_scale=scale, device=ctx.device,
                   seed=seed, progress=progress, checkpoint=out / "checkpoints" / CHECKPOINT_NAME, resume=resume,
                   settings=settings)
    metrics: dict[str, Any] = {"top1": res["top1"], "top5": res["top5"]}
    if linear:
        lin = run_linear(src_run, baseline=baseline, label_fraction=label_fraction, train_subset=train_subset,
                         test_subset=test_subset, device=device, seed=seed, progress=progress, **data_opts)
        metrics.update(linear_top1=lin["metrics"]["top1"], linear_top5=lin["metrics"]["top5"])
    metrics["history"] = res["history"]
    total = time.perf_counter() - t0
    payload = {"kind": "finetune", "baseline": baseline, "run_dir": str(ctx.run_dir),
               "recipe": str(ctx.cfg.get("name", "")), "created": _dt.datetime.now().isoformat(timespec="seconds"),
               **({"source_run": str(src_run), "dataset": data.label, "dataset_spec": data.describe()}
                  if ctx.run_dir != src_run and data is not None else {}),
               "metrics": metrics, "settings": {**settings, "peak_lr": res["peak_lr"], "steps": res["steps"],
                                                "device": str(ctx.device)},
               "seconds": {"finetune": round(res["seconds"], 3), "total": round(total, 3)}}
    path = write_results(out / "results.json", payload)
    lin_txt = f", linear probe {metrics['linear_top1']:.2f}" if "linear_top1" in metrics else ""
    frac = f", {label_fraction:g} of the labels" if label_fraction is not None else ""
    append_report_row(ctx.run_dir / "eval" / "report.md", [
        payload["created"].replace("T", " "), "finetune", baseline if baseline != "none" else "encoder",
        f"{data.label if data is not None else ctx.cfg.data.name} {len(test_ds)} / {len(train_ds)}",
        f"top-1 {metrics['top1']:.2f}{lin_txt} ({epochs} epochs{frac})", f"{total:.1f} s",
        f"[results]({path.relative_to(ctx.run_dir / 'eval')})"])
    return {**payload, "results_path": str(path)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sslkit.eval.sources import add_dataset_arguments

    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run directory, its -latest link, or a file inside it")
    add_dataset_arguments(p, train_help="split fine-tuned (and linearly probed) on (default: train)",
                          eval_help="split scored (default: the run's data.eval_split, else test)")
    p.add_argument("--baseline", choices=("none", "random"), default="none",
                   help="start from the run's encoder (none) or a random one of its architecture (supervised from "
                        "scratch)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="MAE: 100 for ViT-B, 50 for ViT-L")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per step")
    p.add_argument("--lr", type=float, default=None,
                   help=f"base lr for batch 256, scaled linearly (default {VIT_BASE_LR:g} for ViTs, {CNN_BASE_LR:g} "
                        "for CNNs)")
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, help="AdamW weight decay")
    p.add_argument("--layer-decay", type=float, default=VIT_LAYER_DECAY,
                   help="ViTs: lr factor per block from the top (MAE: 0.65 for ViT-B, 0.75 for ViT-L); 1 = none")
    p.add_argument("--drop-path", type=float, default=VIT_DROP_PATH, help="ViTs: stochastic depth rate")
    p.add_argument("--label-smoothing", type=float, default=LABEL_SMOOTHING, help="cross-entropy label smoothing")
    p.add_argument("--warmup-epochs", type=float, default=WARMUP_EPOCHS, help="linear lr warmup (MAE: 5 of 100)")
    p.add_argument("--label-fraction", type=float, default=None, metavar="F",
                   help="fine-tune (and probe) on a fixed class-balanced fraction F of the train labels (0.01, 0.1)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="area range of the random resized crops (default: the run's pretraining crops, e.g. 0.5 1 "
                        "for the DINO CPU recipes, else ImageNet's 0.08 1)")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe beside it")
    p.add_argument("--resume", action="store_true",
                   help="continue from RUN/eval/finetune*/checkpoints/last.ckpt (RUN/transfer/<dataset>-<hash>/eval/"
                        "finetune*/ with --dataset; give the same dataset options)")
    p.add_argument("--train-subset", type=int, default=None, metavar="N", help="fixed random N train images")
    p.add_argument("--test-subset", type=int, default=None, metavar="N", help="fixed random N test images")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="subsets, label fraction, head, augmentation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """``sslkit eval finetune RUN``: prints fine-tuned and linear-probe top-1 / top-5 side by side."""
    import sys

    from sslkit.data.base import DataError
    from sslkit.eval.cli import format_table
    from sslkit.eval.sources import dataset_options
    from sslkit.registry import RegistryError, error_line
    from sslkit.run import RunError

    try:
        res = run_finetune(args.run, baseline=args.baseline, epochs=args.epochs, batch_size=args.batch_size,
                           base_lr=args.lr, weight_decay=args.weight_decay, layer_decay=args.layer_decay,
                           drop_path=args.drop_path, label_smoothing=args.label_smoothing,
                           warmup_epochs=args.warmup_epochs, label_fraction=args.label_fraction,
                           linear=not args.no_linear, resume=args.resume, train_subset=args.train_subset,
                           test_subset=args.test_subset, device=args.device, seed=args.seed,
                           progress=not args.no_progress, crop_scale=args.crop_scale, **dataset_options(args))
    except (EvalError, DataError, RunError, RegistryError) as e:
        print(f"sslkit: error: {error_line(e)}", file=sys.stderr)
        return 2
    m = res["metrics"]
    columns = {"fine-tuned": {"top1": m["top1"], "top5": m["top5"]}}
    if "linear_top1" in m:
        columns["linear probe (frozen)"] = {"top1": m["linear_top1"], "top5": m["linear_top5"]}
    print(format_table(columns))
    print(f"results: {res['results_path']}")
    return 0

