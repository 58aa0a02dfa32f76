"""The interface every objective implements; the engine calls only these methods."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslkit.encoders import Encoder


@dataclass
class ObjectiveConfig:
    name: str = "simclr"


class Objective(nn.Module):
    """Base class. Subclasses set ``Config`` and implement :meth:`forward`.

    Attributes:
        views: which augmentation family the objective needs: "pair" (exactly 2 same-size views),
            "multicrop" (2 global views then local views) or "single" (one view). The recipe is
            checked against it before any work starts.
    """

    Config: type = ObjectiveConfig
    views: str = "pair"

    def __init__(self, encoder: Encoder, cfg) -> None:
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg
        self.steps_per_epoch = 1
        self.total_steps = 1

    def setup_schedule(self, steps_per_epoch: int, total_steps: int) -> None:
        """Called once before training so per-step schedules can be computed up front."""
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.total_steps = max(1, int(total_steps))

    def forward(self, views: list[torch.Tensor], step: int = 0) -> dict[str, torch.Tensor]:
        """``views``: list of (B, 3, h, w) batches. Returns ``{"loss": scalar, ...other scalars to log}``."""
        raise NotImplementedError

    def on_after_backward(self, step: int) -> None:
        """Between backward and the optimiser step (e.g. cancel gradients of a frozen layer)."""

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        """After the optimiser step (EMA updates, schedules)."""

    def eval_encoder(self) -> Encoder:
        """The encoder evaluation should use (DINO: the teacher's)."""
        return self.encoder

    def no_weight_decay(self) -> set[str]:
        """Full parameter names excluded from weight decay besides biases and 1-d parameters."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
