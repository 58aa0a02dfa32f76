"""SimCLR (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

The loss is NT-Xent. Under DDP, embeddings are gathered from all ranks with a differentiable all-gather,
so every rank contrasts its positives against the global batch, and the gradient that flows back equals
the single-process gradient on the concatenated batch (lightly #1176 and #1528 show the failure modes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslkit.encoders import Encoder
from sslkit.heads import ProjectionHead
from sslkit.losses.distributed import gather_with_grad
from sslkit.losses.nt_xent import nt_xent
from sslkit.objectives.base import Objective, Views
from sslkit.registry import OBJECTIVES

__all__ = ["ProjectionHead", "SimCLR", "SimCLRConfig", "gather_with_grad", "nt_xent"]


@dataclass
class SimCLRConfig:
    name: str = "simclr"
    temperature: float = 0.5  # tau; the paper uses 0.5 for CIFAR-10 and 0.1 with large ImageNet batches
    proj_hidden_dim: int = 2048
    proj_out_dim: int = 128
    proj_layers: int = 2  # SimCLR v1: 2; v2: 3
    proj_last_bn: bool = False
    gather_distributed: bool = True  # negatives from all ranks under DDP
    # DCL: the positive is left out of the denominator (Yeh et al. 2022); lightly's DCLLoss without weighting
    decoupled: bool = False


@OBJECTIVES.register("simclr", config=SimCLRConfig, help="SimCLR: NT-Xent on two views with a projection head")
class SimCLR(Objective):
    Config = SimCLRConfig
    views = Views(num_global=2)

    def __init__(self, encoder: Encoder, cfg: SimCLRConfig) -> None:
        super().__init__(encoder, cfg)
        if cfg.temperature <= 0:
            raise ValueError(f"objective.temperature must be > 0, got {cfg.temperature}")
        self.head = ProjectionHead(encoder.dim, cfg.proj_hidden_dim, cfg.proj_out_dim, cfg.proj_layers,
                                   cfg.proj_last_bn)

    def forward(self, views: list[torch.Tensor], step: int = 0) -> dict[str, torch.Tensor]:
        x0, x1 = views
        # One forward over both views: BatchNorm sees the full 2n batch, and one big matmul beats two.
        z = self.head(self.encoder(torch.cat([x0, x1], dim=0)))
        z0, z1 = z.chunk(2, dim=0)
        loss = nt_xent(z0, z1, self.cfg.temperature, gather=self.cfg.gather_distributed,
                       decoupled=self.cfg.decoupled)
        return {"loss": loss}
