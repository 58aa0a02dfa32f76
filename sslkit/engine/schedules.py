"""Per-step schedules, computed up front and indexed by the global step (as the official DINO code does)."""

from __future__ import annotations

import math

import numpy as np
import torch
from omegaconf import DictConfig


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Per-step values: linear warmup ``warmup_start -> start`` over ``warmup_steps``, then cosine ``start -> end``."""
    total_steps = max(1, int(total_steps))
    warmup_steps = min(max(0, int(warmup_steps)), total_steps)
    warm = np.linspace(warmup_start, start, warmup_steps, endpoint=False)
    rest = total_steps - warmup_steps
    t = np.arange(rest) / max(1, rest)
    cos = end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))
    return np.concatenate([warm, cos])


def scaled_lr(cfg: DictConfig, global_batch: int) -> float:
    """``optim.lr`` scaled with the global batch: linear (lr*B/256), sqrt (lr*sqrt(B/256)) or none."""
    rule = cfg.optim.lr_scaling
    if rule == "linear":
        return cfg.optim.lr * global_batch / 256
    if rule == "sqrt":
        return cfg.optim.lr * math.sqrt(global_batch / 256)
    return cfg.optim.lr


class Schedules:
    """The learning rate (warmup then cosine) and weight decay (cosine) of every step of a run of ``total`` steps.

    :meth:`fit` recomputes both for a new total (the time budget does); the warmup does not depend on it.
    """

    def __init__(self, cfg: DictConfig, global_batch: int, steps_per_epoch: int, total_steps: int) -> None:
        o = cfg.optim
        self.peak_lr = scaled_lr(cfg, global_batch)
        self.min_lr = o.min_lr
        self.warmup = int(round(o.warmup_epochs * steps_per_epoch))
        self.wd, self.wd_end = o.weight_decay, (o.weight_decay if o.weight_decay_end is None else o.weight_decay_end)
        self.fit(total_steps)

    def fit(self, total_steps: int) -> None:
        self.lr = cosine_schedule(self.peak_lr, self.min_lr, total_steps, self.warmup)
        self.weight_decay = cosine_schedule(self.wd, self.wd_end, total_steps)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set this step's learning rate and weight decay on every parameter group (``wd_mult`` 0 keeps it off)."""
        for g in optimizer.param_groups:
            g["lr"] = float(self.lr[step])
            g["weight_decay"] = float(self.weight_decay[step]) * g["wd_mult"]
