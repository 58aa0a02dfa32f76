"""SimSiam as a third-party plug-in: an objective that lives outside sslkit and trains with ``sslkit pretrain``.

SimSiam (Chen & He, 2021, "Exploring Simple Siamese Representation Learning", CVPR; arXiv:2011.10566): two views
go through one encoder and projector; a predictor on each side predicts the other side's projection, whose
gradient is stopped. No negatives, no momentum encoder: the stop-gradient alone prevents collapse.

Run it from a clone of sslkit::

    SSLKIT_PLUGINS=simsiam_plugin PYTHONPATH=examples sslkit pretrain examples/simsiam_fmnist.yaml

``$SSLKIT_PLUGINS`` names modules that sslkit imports in every process (DDP workers too), after its own; this one
registers the objective ``simsiam`` when it is imported. It uses sslkit's public building blocks only: the
:class:`~sslkit.objectives.base.Objective` interface, a projection head and a loss function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslkit.heads import ProjectionHead
from sslkit.losses.negative_cosine import negative_cosine
from sslkit.objectives.base import Objective, Views
from sslkit.registry import OBJECTIVES


@dataclass
class SimSiamConfig:
    """The recipe's ``objective`` section: every key is checked, with its type, before any work starts."""

    name: str = "simsiam"
    proj_dim: int = 2048  # the paper's projector: 3 layers of 2048, BatchNorm on the output
    pred_hidden_dim: int = 512  # the predictor's bottleneck (paper: 512)


@OBJECTIVES.register("simsiam", config=SimSiamConfig, help="SimSiam (plug-in example): stop-gradient siamese")
class SimSiam(Objective):
    Config = SimSiamConfig
    views = Views(num_global=2)  # two views of one size; the recipe check asks the augmentation for them

    def __init__(self, encoder, cfg: SimSiamConfig) -> None:  # noqa: ANN001 - an sslkit Encoder
        super().__init__(encoder, cfg)
        self.projector = ProjectionHead(encoder.dim, cfg.proj_dim, cfg.proj_dim, num_layers=3, last_bn=True)
        self.predictor = ProjectionHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, num_layers=2)

    def forward(self, views: list[torch.Tensor], step: int = 0) -> dict[str, torch.Tensor]:
        z = self.projector(self.encoder(torch.cat(views, dim=0)))  # (2B, D): both views in one pass
        p = self.predictor(z)
        z0, z1 = z.detach().chunk(2)  # the stop-gradient
        p0, p1 = p.chunk(2)
        loss = 0.5 * (negative_cosine(p0, z1) + negative_cosine(p1, z0))
        return {"loss": loss}
