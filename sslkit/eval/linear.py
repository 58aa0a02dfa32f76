"""Linear probing of frozen features.

Two paths:

* **Fast path** (:func:`linear_probe`): a linear classifier on cached features. Every (lr, weight decay) pair
  of the sweep is trained at once, as one stacked weight tensor ``(G, D, C)`` updated by SGD with momentum
  and a cosine schedule, on a training split carved out of the *train* set; the pair with the best top-1 on
  the held-out validation part is retrained on the whole train set and scored once on the test set. The test
  set never takes part in the choice. An optional ``BatchNorm1d(affine=False)`` in front of the classifier
  standardises the features (the MAE linear-probe recipe, He et al. 2022, Sec. A.2), which makes the
  learning rate far less sensitive to the encoder's feature scale.
* **Paper path** (:func:`linear_probe_images`): the classifier sees features of augmented images
  (random resized crop + horizontal flip) from the frozen encoder on every step, SGD + cosine for N epochs
  (the DINO/MAE protocol). Slow on a CPU: meant for GPU recipes that ask for it.

Example::

    res = linear_probe(train_f, train_y, test_f, test_y, lrs=(0.01, 0.1), weight_decays=(0.0, 1e-4))
    res["top1"], res["best"]  # test accuracy (%), {"lr": ..., "weight_decay": ...}
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_LRS = (0.01, 0.1, 1.0)
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-5, 1e-4)
DEFAULT_EPOCHS = 30  # converges on BN-standardised features; each epoch is one pass for every grid point
DEFAULT_BATCH_SIZE = 1024  # None or <= 0 = full batch
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_MOMENTUM = 0.9
TOPK_ACCURACY = 5
BN_EPS = 1e-6


def _device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class LinearHeads:
    """G linear classifiers sharing one (optional) feature standardisation.

    ``weight`` (G, D, C), ``bias`` (G, C); ``mean``/``var`` (D,) are the BatchNorm running statistics
    (None without BatchNorm).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor | None = None
    var: torch.Tensor | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D) -> (G, N, C)``."""
        if self.mean is not None and self.var is not None:
            x = (x - self.mean) / torch.sqrt(self.var + BN_EPS)
        return torch.einsum("nd,gdc->gnc", x, self.weight) + self.bias[:, None, :]


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, topk: int = TOPK_ACCURACY) -> tuple[float, float]:
    """Top-1 and top-``topk`` accuracy (%) of ``(N, C)`` logits against ``(N,)`` labels."""
    if len(labels) == 0:
        return 0.0, 0.0
    k = min(topk, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (N, k)
    hit = top == labels[:, None]
    return 100.0 * hit[:, 0].float().mean().item(), 100.0 * hit.any(dim=1).float().mean().item()


def fit_linear_heads(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, lrs: Sequence[float],
                     weight_decays: Sequence[float], epochs: int = DEFAULT_EPOCHS,
                     batch_size: int | None = DEFAULT_BATCH_SIZE, batchnorm: bool = False,
                     momentum: float = DEFAULT_MOMENTUM, seed: int = 0,
                     device: str | torch.device | None = None) -> LinearHeads:
    """Train one linear classifier per ``(lrs[g], weight_decays[g])`` pair, all in one loop.

    Args:
        x: ``(N, D)`` features.  y: ``(N,)`` long labels.
        lrs, weight_decays: equal-length sequences, one entry per classifier (G of them).
        epochs: passes over the data; the lr follows a cosine from ``lr`` to 0 over all steps.
        batch_size: mini-batch size; None or <= 0 = full batch.
        batchnorm: standardise features with ``BatchNorm1d(affine=False)`` (running stats at test time).
        momentum: SGD momentum. Weight decay is L2 on the weights (not the bias).

    Returns:
        :class:`LinearHeads` on the CPU.
    """
    if len(lrs) != len(weight_decays) or not lrs:
        raise ValueError("lrs and weight_decays must be non-empty and of equal length")
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    dev = _device(device)
    g = torch.Generator().manual_seed(seed)
    x, y = x.float().to(dev), y.long().to(dev)
    n, d = x.shape
    bs = n if not batch_size or batch_size <= 0 else min(batch_size, n)
    heads = len(lrs)
    weight = torch.zeros(heads, d, num_classes, device=dev, requires_grad=True)  # (G, D, C); zero init, as MAE
    bias = torch.zeros(heads, num_classes, device=dev, requires_grad=True)  # (G, C)
    lr = torch.tensor(list(lrs), dtype=torch.float32, device=dev)  # (G,)
    wd = torch.tensor(list(weight_decays), dtype=torch.float32, device=dev)  # (G,)
    bufs = [torch.zeros_like(weight), torch.zeros_like(bias)]
    bn = nn.BatchNorm1d(d, affine=False, eps=BN_EPS).to(dev) if batchnorm else None
    steps_per_epoch = math.ceil(n / bs)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).to(dev)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            if bn is not None and len(idx) < 2:  # BatchNorm cannot standardise a single sample
                step += 1
                continue
            xb = bn(x[idx]) if bn is not None else x[idx]  # (B, D)
            logits = torch.einsum("bd,gdc->gbc", xb, weight) + bias[:, None, :]  # (G, B, C)
            # Sum over heads of each head's mean loss: every head's gradient is its own loss's gradient.
            loss = F.cross_entropy(logits.reshape(-1, num_classes), y[idx].repeat(heads), reduction="sum") / len(idx)
            gw, gb = torch.autograd.grad(loss, [weight, bias])
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total))  # cosine schedule
            with torch.no_grad():
                gw = gw + wd[:, None, None] * weight
                bufs[0].mul_(momentum).add_(gw)
                bufs[1].mul_(momentum).add_(gb)
                weight -= scale * lr[:, None, None] * bufs[0]
                bias -= scale * lr[:, None] * bufs[1]
            step += 1
    mean = var = None
    if bn is not None:
        mean, var = bn.running_mean.detach().cpu(), bn.running_var.detach().cpu()
    return LinearHeads(weight.detach().cpu(), bias.detach().cpu(), mean, var)


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a fixed, class-balanced ``fraction`` of ``labels`` (SimCLR's 1% / 10% label protocol).

    Every class keeps ``max(1, round(fraction * count))`` of its items, drawn by a generator seeded with ``seed``
    (the same subset on every call and machine). Unlabelled items (-1) are never drawn.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}; e.g. 0.01 or 0.1 (SimCLR's 1% and 10%)")
    labels = torch.as_tensor(labels).long()
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(labels[labels >= 0]).tolist():
        idx = (labels == c).nonzero().flatten()
        k = max(1, int(round(fraction * len(idx))))
        keep.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    if not keep:
        raise ValueError("a label fraction needs labelled data; every label is -1")
    return torch.cat(keep).sort().values


def split_train_val(n: int, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random disjoint ``(fit_idx, val_idx)`` over ``range(n)``, at least one item in each."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        raise ValueError(f"a validation split needs at least 2 training items, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, int(round(n * val_fraction))), n - 1)
    return perm[n_val:], perm[:n_val]


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, lrs: Sequence[float] = DEFAULT_LRS,
                 weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, epochs: int = DEFAULT_EPOCHS,
                 batch_size: int | None = DEFAULT_BATCH_SIZE, val_fraction: float = DEFAULT_VAL_FRACTION,
                 batchnorm: bool = False, num_classes: int | None = None, seed: int = 0,
                 device: str | torch.device | None = None, label_fraction: float | None = None) -> dict:
    """Linear-probe accuracy on features, with lr and weight decay chosen on a validation split of train.

    Args:
        train_feats: ``(N, D)``; train_labels ``(N,)``; test_feats ``(Q, D)``; test_labels ``(Q,)``.
        lrs, weight_decays: the grid swept (every combination).
        epochs, batch_size, batchnorm: see :func:`fit_linear_heads`.
        val_fraction: share of the train set held out to choose the hyper-parameters.
        num_classes: C; None = 1 + the largest label.
        label_fraction: keep only this class-balanced fraction of the train labels (:func:`balanced_subset`,
            seeded with ``seed``); the test set is whole.

    Returns:
        ``{"top1", "top5"}`` on the test set (%), ``"best"`` ({lr, weight_decay, val_top1}), ``"sweep"`` (one row per
        grid point with its validation top-1), ``"train_top1"`` of the final classifier, and the settings.
    """
    if (torch.as_tensor(train_labels) < 0).any():
        raise ValueError("a linear probe needs labelled data; found label -1 (unlabelled images)")
    train_y, test_y = train_labels.long().cpu(), test_labels.long().cpu()
    if label_fraction is not None:
        keep = balanced_subset(train_y, label_fraction, seed)
        train_feats, train_y = train_feats[keep], train_y[keep]
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max() if len(test_y) else 0)) + 1
    grid = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    fit_idx, val_idx = split_train_val(len(train_y), val_fraction, seed)
    t0 = time.perf_counter()
    sweep_heads = fit_linear_heads(train_feats[fit_idx], train_y[fit_idx], num_classes,
                                   lrs=[g[0] for g in grid], weight_decays=[g[1] for g in grid], epochs=epochs,
                                   batch_size=batch_size, batchnorm=batchnorm, seed=seed, device=device)
    val_logits = sweep_heads.logits(train_feats[val_idx].float())  # (G, V, C)
    sweep = [{"lr": lr, "weight_decay": wd, "val_top1": topk_accuracy(val_logits[i], train_y[val_idx])[0]}
             for i, (lr, wd) in enumerate(grid)]
    best = max(sweep, key=lambda r: r["val_top1"])  # first on ties: the smaller lr / weight decay
    final = fit_linear_heads(train_feats, train_y, num_classes, lrs=[best["lr"]], weight_decays=[best["weight_decay"]],
                             epochs=epochs, batch_size=batch_size, batchnorm=batchnorm, seed=seed, device=device)
    top1, top5 = topk_accuracy(final.logits(test_feats.float())[0], test_y)
    train_top1 = topk_accuracy(final.logits(train_feats.float())[0], train_y)[0]
    return {"top1": top1, "top5": top5, "best": dict(best), "sweep": sweep, "train_top1": train_top1,
            "settings": {"epochs": epochs, "batch_size": batch_size, "batchnorm": batchnorm,
                         "val_fraction": val_fraction, "num_fit": len(fit_idx), "num_val": len(val_idx),
                         "num_classes": num_classes, "optimizer": f"sgd(momentum={DEFAULT_MOMENTUM}), cosine",
                         "seed": seed, "label_fraction": label_fraction, "num_train": len(train_y)},
            "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------------------
# Paper path: augmented images through the frozen encoder
# ----------------------------------------------------------------------------------------------------------

PAPER_EPOCHS = 100  # DINO: 100 epochs; MAE: 90
PAPER_LR = 0.1  # for a batch of 256 (scaled linearly with the batch size, Goyal et al.)
PAPER_WEIGHT_DECAY = 0.0
PAPER_BATCH_SIZE = 256
LR_REFERENCE_BATCH = 256
PAPER_CROP_SCALE = (0.08, 1.0)


def train_augmentation(image_size: int, crop_scale: Sequence[float] = PAPER_CROP_SCALE):
    """Random resized crop + horizontal flip + normalisation, per uint8 image ``(3, H, W)``."""
    from torchvision.transforms import v2

    from sslkit.augment.base import to_float

    return v2.Compose([v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True),
                       v2.RandomHorizontalFlip(), *to_float()])


def linear_probe_images(encoder: nn.Module, train_dataset, test_dataset, *, image_size: int,
                        epochs: int = PAPER_EPOCHS, lr: float = PAPER_LR, weight_decay: float = PAPER_WEIGHT_DECAY,
                        batch_size: int = PAPER_BATCH_SIZE, batchnorm: bool = True, num_workers: int = 0,
                        num_classes: int | None = None, device: str | torch.device | None = None, seed: int = 0,
                        progress: bool = True) -> dict:
    """Linear probe trained on augmented images with the encoder frozen (DINO ``eval_linear.py``, MAE ``main_linprobe``).

    Every step: random resized crop + flip of a batch, frozen encoder forward (eval mode, no_grad),
    ``[BatchNorm1d(affine=False)] -> Linear``, SGD (momentum 0.9) with lr ``lr * batch / 256`` on a cosine.
    Test accuracy uses the deterministic eval view (:func:`sslkit.eval.features.extract_features`).

    Returns:
        ``{"top1", "top5", "train_loss", "settings", "seconds"}``.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from sslkit.eval.features import _autocast, _inference_mode, _Transformed, extract_features

    dev = _device(device)
    encoder.to(dev)
    labels = getattr(train_dataset, "labels", None)
    if num_classes is None:
        num_classes = len(getattr(train_dataset, "classes", [])) or int(torch.as_tensor(labels).max()) + 1
    dim = int(encoder.dim)
    head = nn.Sequential(*([nn.BatchNorm1d(dim, affine=False, eps=BN_EPS)] if batchnorm else []),
                         nn.Linear(dim, num_classes)).to(dev)
    nn.init.trunc_normal_(head[-1].weight, std=0.01)
    nn.init.zeros_(head[-1].bias)
    scaled_lr = lr * batch_size / LR_REFERENCE_BATCH
    opt = torch.optim.SGD(head.parameters(), lr=scaled_lr, momentum=DEFAULT_MOMENTUM, weight_decay=weight_decay)
    loader = DataLoader(_Transformed(train_dataset, train_augmentation(image_size)), batch_size=batch_size,
                        shuffle=True, drop_last=False, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
    t0, loss_val = time.perf_counter(), float("nan")
    torch.manual_seed(seed)  # the augmentation's randomness
    bar = tqdm(total=epochs * len(loader), desc="linear (images)", unit="step", disable=not progress)
    for _ in range(epochs):
        head.train()
        for images, y in loader:
            with _inference_mode(encoder), _autocast(dev):
                f = encoder(images.to(dev, non_blocking=True)).float()  # (B, D), frozen
            loss = F.cross_entropy(head(f), y.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_val = loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}")
    bar.close()
    test_f, test_y = extract_features(encoder, test_dataset, image_size=image_size, batch_size=batch_size,
                                      device=dev, progress=progress, desc="test features")
    head.eval()
    with torch.no_grad():
        logits = head(test_f.to(dev)).cpu()  # (Q, C)
    top1, top5 = topk_accuracy(logits, test_y)
    return {"top1": top1, "top5": top5, "train_loss": loss_val,
            "settings": {"epochs": epochs, "lr": lr, "scaled_lr": scaled_lr, "weight_decay": weight_decay,
                         "batch_size": batch_size, "batchnorm": batchnorm, "crop_scale": list(PAPER_CROP_SCALE),
                         "optimizer": f"sgd(momentum={DEFAULT_MOMENTUM}), cosine", "seed": seed},
            "seconds": time.perf_counter() - t0}
