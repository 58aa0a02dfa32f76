"""Heads that objectives put on top of an encoder, and the momentum teacher.

- :class:`~sslkit.heads.mlp.ProjectionHead`: the Linear-BN-ReLU MLP of SimCLR, BYOL, VICReg, Barlow Twins
  and MoCo v3 (projectors, expanders and predictors differ only in sizes and the last BatchNorm).
- :class:`~sslkit.heads.dino.DINOHead`: MLP, L2 normalisation, weight-normalised prototypes.
- :class:`~sslkit.heads.momentum.MomentumTeacher`: EMA copies of student modules with a cosine momentum
  schedule (DINO, BYOL, MoCo v3).
"""

from sslkit.heads.dino import DINOHead
from sslkit.heads.mlp import ProjectionHead
from sslkit.heads.momentum import MomentumTeacher, cosine_momentum, strip_stochastic_depth

__all__ = ["DINOHead", "MomentumTeacher", "ProjectionHead", "cosine_momentum", "strip_stochastic_depth"]
