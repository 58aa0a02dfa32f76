"""BYOL (Grill et al., 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
arXiv:2006.07733).

An online network (encoder, projector, predictor) predicts the projection that a target network (an EMA of the
online encoder and projector) makes of the other view. No negatives: the predictor and the slowly moving
target keep the representation from collapsing. Per step::

    z_online = projector(encoder(x_v)),  p_v = predictor(z_online)      # both views, one pass
    z_target_v = target(x_v)                                             # no gradients
    loss = (neg_cos(p_0, z_target_1) + neg_cos(p_1, z_target_0)) / 2
    ... optimiser step on the online network ...
    target <- m target + (1 - m) online                                  # m: cosine 0.99 -> 1, per step

The paper's two views are asymmetric: blur with probability 1.0 / 0.1 and solarisation 0 / 0.2, which is the
``multicrop`` pipeline with ``num_local: 0`` (see ``recipes/byol_*.yaml``). Evaluation uses the online encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslkit.encoders import Encoder
from sslkit.heads import MomentumTeacher, ProjectionHead
from sslkit.losses.negative_cosine import byol_loss
from sslkit.objectives.base import Objective, Views
from sslkit.registry import OBJECTIVES


@dataclass
class BYOLConfig:
    name: str = "byol"
    proj_hidden_dim: int = 4096  # the paper's projector: 4096 hidden, 256 out
    proj_out_dim: int = 256
    pred_hidden_dim: int = 4096  # the predictor has the projector's shape
    # Target momentum, cosine from `momentum_start` to `momentum_end` over all steps. The paper uses 0.996 at
    # batch 4096; smaller batches and shorter runs want 0.99 (solo-learn's CIFAR setting).
    momentum_start: float = 0.99
    momentum_end: float = 1.0


@OBJECTIVES.register("byol", config=BYOLConfig,
                     help="BYOL: online network predicts an EMA target's projection of the other view (Grill 2020)")
class BYOL(Objective):
    """BYOL objective: online encoder + projector + predictor, EMA target of encoder + projector."""

    Config = BYOLConfig
    views = Views(num_global=2)

    def __init__(self, encoder: Encoder, cfg: BYOLConfig) -> None:
        super().__init__(encoder, cfg)
        self.projector = ProjectionHead(encoder.dim, cfg.proj_hidden_dim, cfg.proj_out_dim, num_layers=2)
        self.predictor = ProjectionHead(cfg.proj_out_dim, cfg.pred_hidden_dim, cfg.proj_out_dim, num_layers=2)
        self.teacher = MomentumTeacher(self.students(), cfg.momentum_start, cfg.momentum_end)

    def students(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "projector": self.projector}

    def forward(self, views: list[torch.Tensor], step: int = 0) -> dict[str, torch.Tensor]:
        x = torch.cat(views, dim=0)  # (2B, 3, H, W): one pass, BatchNorm over both views
        p0, p1 = self.predictor(self.projector(self.encoder(x))).chunk(2)  # (B, D) each
        with torch.no_grad():
            z0, z1 = self.teacher["projector"](self.teacher["encoder"](x)).chunk(2)
        loss = byol_loss(p0, p1, z0, z1)
        m = self.teacher.momentum(step, self.total_steps)
        return {"loss": loss, "teacher_momentum": torch.tensor(m, device=loss.device)}
