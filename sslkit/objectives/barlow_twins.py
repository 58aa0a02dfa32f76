"""Barlow Twins (Zbontar, Jing, Misra, LeCun & Deny, 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", ICML; arXiv:2103.03230).

Two views go through the encoder and a projector; the cross-correlation matrix of the batch-standardised
embeddings is pushed towards the identity: its diagonal to 1 (invariance), its off-diagonal entries to 0 with
weight 5e-3 (redundancy reduction). Under DDP the matrix is computed over the gathered global batch
(:func:`sslkit.losses.barlow_twins.barlow_twins_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslkit.encoders import Encoder
from sslkit.heads import ProjectionHead
from sslkit.losses.barlow_twins import barlow_twins_loss
from sslkit.objectives.base import Objective, Views
from sslkit.registry import OBJECTIVES


@dataclass
class BarlowTwinsConfig:
    name: str = "barlow_twins"
    proj_dim: int = 8192  # the paper's projector: 3 layers of 8192
    proj_layers: int = 3
    lambda_offdiag: float = 5.0e-3  # weight of the off-diagonal (redundancy) term
    gather_distributed: bool = True  # cross-correlation over the global batch under DDP


@OBJECTIVES.register("barlow_twins", config=BarlowTwinsConfig,
                     help="Barlow Twins: cross-correlation of two views' embeddings towards identity (Zbontar 2021)")
class BarlowTwins(Objective):
    Config = BarlowTwinsConfig
    views = Views(num_global=2)

    def __init__(self, encoder: Encoder, cfg: BarlowTwinsConfig) -> None:
        super().__init__(encoder, cfg)
        if cfg.lambda_offdiag < 0:
            raise ValueError(f"objective.lambda_offdiag must be >= 0, got {cfg.lambda_offdiag}")
        self.projector = ProjectionHead(encoder.dim, cfg.proj_dim, cfg.proj_dim, cfg.proj_layers)

    def forward(self, views: list[torch.Tensor], step: int = 0) -> dict[str, torch.Tensor]:
        z0, z1 = self.projector(self.encoder(torch.cat(views, dim=0))).chunk(2)  # (B, D) each
        loss = barlow_twins_loss(z0, z1, self.cfg.lambda_offdiag, gather=self.cfg.gather_distributed)
        return {"loss": loss}
