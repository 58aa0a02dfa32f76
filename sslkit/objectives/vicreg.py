"""VICReg (Bardes, Ponce & LeCun, 2022, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning", ICLR; arXiv:2105.04906).

Two views go through the encoder and an expander; the loss pulls the two embeddings together (invariance), keeps
every dimension's standard deviation above 1 over the batch (variance) and decorrelates the dimensions
(covariance), with weights 25 / 25 / 1. No negatives, no teacher. Under DDP the variance and covariance are
computed on the gathered global batch (:func:`sslkit.losses.vicreg.vicreg_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslkit.encoders import Encoder
from sslkit.heads import ProjectionHead
from sslkit.losses.vicreg import vicreg_terms
from sslkit.objectives.base import Objective, Views
from sslkit.registry import OBJECTIVES


@dataclass
class VICRegConfig:
    name: str = "vicreg"
    expander_dim: int = 8192  # the paper's expander: 3 layers of 8192
    expander_layers: int = 3
    sim_weight: float = 25.0  # lambda, invariance
    var_weight: float = 25.0  # mu, variance
    cov_weight: float = 1.0  # nu, covariance
    gather_distributed: bool = True  # variance and covariance over the global batch under DDP


@OBJECTIVES.register("vicreg", config=VICRegConfig,
                     help="VICReg: invariance, variance and covariance terms on two views (Bardes 2022)")
class VICReg(Objective):
    Config = VICRegConfig
    views = Views(num_global=2)

    def __init__(self, encoder: Encoder, cfg: VICRegConfig) -> None:
        super().__init__(encoder, cfg)
        for key in ("sim_weight", "var_weight", "cov_weight"):
            if getattr(cfg, key) < 0:
                raise ValueError(f"objective.{key} must be >= 0, got {getattr(cfg, key)}")
        self.expander = ProjectionHead(encoder.dim, cfg.expander_dim, cfg.expander_dim, cfg.expander_layers)

    def forward(self, views: list[torch.Tensor], step: int = 0) -> dict[str, torch.Tensor]:
        z0, z1 = self.expander(self.encoder(torch.cat(views, dim=0))).chunk(2)  # (B, D) each
        t = vicreg_terms(z0, z1, gather=self.cfg.gather_distributed)
        c = self.cfg
        loss = c.sim_weight * t["invariance"] + c.var_weight * t["variance"] + c.cov_weight * t["covariance"]
        return {"loss": loss, **{k: v.detach() for k, v in t.items()}}
