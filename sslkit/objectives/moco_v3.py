"""MoCo v3 (Chen, Xie & He, 2021, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV;
arXiv:2104.02057).

A query network (encoder, projector, predictor) and a momentum network (EMA of encoder and projector) see two
views; each query is contrasted against the momentum keys of the other view, with the keys of the whole global
batch as negatives (no queue). Per step, following Algorithm 1::

    q_v = predictor(projector(encoder(x_v)))          # both views, one pass
    k_v = momentum_projector(momentum_encoder(x_v))   # no gradients
    loss = ctr(q_0, k_1) + ctr(q_1, k_0),  ctr = 2T * CrossEntropy(q k_all^T / T, own index)
    momentum <- m momentum + (1 - m) query            # m: cosine 0.99 -> 1, per step

With a ViT the paper freezes the random patch projection for stability (``freeze_patch_embed``) and uses T=0.2;
with a ResNet-50, T=1.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslkit.encoders import Encoder
from sslkit.heads import MomentumTeacher, ProjectionHead
from sslkit.losses.infonce import moco_v3_symmetric
from sslkit.objectives.base import Objective, Views
from sslkit.registry import OBJECTIVES


@dataclass
class MoCoV3Config:
    name: str = "moco_v3"
    temperature: float = 0.2  # T: 0.2 for ViTs, 1.0 for ResNet-50 (paper)
    proj_hidden_dim: int = 4096  # the paper's heads: projector 3 layers, predictor 2, hidden 4096, out 256
    proj_out_dim: int = 256
    proj_layers: int = 3
    pred_hidden_dim: int = 4096
    momentum_start: float = 0.99  # cosine to momentum_end over all steps (paper: 0.99 -> 1)
    momentum_end: float = 1.0
    # ViTs: keep the random patch projection fixed (the paper's trick against training instability). No effect
    # on CNN encoders.
    freeze_patch_embed: bool = True


@OBJECTIVES.register("moco_v3", config=MoCoV3Config,
                     help="MoCo v3: query vs momentum keys of the global batch, symmetric InfoNCE (Chen 2021)")
class MoCoV3(Objective):
    Config = MoCoV3Config
    views = Views(num_global=2)

    def __init__(self, encoder: Encoder, cfg: MoCoV3Config) -> None:
        super().__init__(encoder, cfg)
        if cfg.temperature <= 0:
            raise ValueError(f"objective.temperature must be > 0, got {cfg.temperature}")
        if cfg.freeze_patch_embed and getattr(encoder, "is_vit", False):
            encoder.model.patch_embed.requires_grad_(False)
        self.projector = ProjectionHead(encoder.dim, cfg.proj_hidden_dim, cfg.proj_out_dim, cfg.proj_layers,
                                        last_bn=True)
        self.predictor = ProjectionHead(cfg.proj_out_dim, cfg.pred_hidden_dim, cfg.proj_out_dim, 2, last_bn=True)
        self.teacher = MomentumTeacher(self.students(), cfg.momentum_start, cfg.momentum_end)

    def students(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "projector": self.projector}

    def forward(self, views: list[torch.Tensor], step: int = 0) -> dict[str, torch.Tensor]:
        x = torch.cat(views, dim=0)  # (2B, 3, H, W)
        q0, q1 = self.predictor(self.projector(self.encoder(x))).chunk(2)  # (B, D) each
        with torch.no_grad():
            k0, k1 = self.teacher["projector"](self.teacher["encoder"](x)).chunk(2)
        loss = moco_v3_symmetric(q0, q1, k0, k1, self.cfg.temperature)
        m = self.teacher.momentum(step, self.total_steps)
        return {"loss": loss, "teacher_momentum": torch.tensor(m, device=loss.device)}
