"""SimCLR (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

The loss is NT-Xent. Under DDP, embeddings are gathered from all ranks with a differentiable all-gather,
so every rank contrasts its positives against the global batch, and the gradient that flows back equals
the single-process gradient on the concatenated batch (lightly #1176 and #1528 show the failure modes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sslkit.encoders import Encoder
from sslkit.objectives.base import Objective
from sslkit.registry import OBJECTIVES


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (n, D) from all ranks -> (world*n, D); gradients flow back to every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float = 0.5, gather: bool = True,
            decoupled: bool = False) -> torch.Tensor:
    """Normalised temperature-scaled cross-entropy.

    Args:
        z0, z1: (n, D) projections of the two views of the same n images (local batch).
        temperature: the softmax temperature tau.
        gather: under torch.distributed, use all ranks' embeddings as negatives.
        decoupled: leave the positive out of the denominator (DCL, Yeh et al. 2022, "Decoupled Contrastive
            Learning"): ``b`` then runs over the negatives only. The plain loss's gradient is scaled down by
            the positive's softmax share, which is large early in training and for small batches; removing it
            learns faster per step.

    Returns:
        Scalar: the mean over the 2n local anchors of
        ``-log exp(s(a, a+)/tau) / sum_{b != a} exp(s(a, b)/tau)`` with cosine similarity s,
        where b runs over both views of all images in the (global) batch (``b != a, a+`` when decoupled).

    Example:
        >>> z0, z1 = torch.randn(8, 128), torch.randn(8, 128)
        >>> loss = nt_xent(z0, z1, temperature=0.1)
    """
    n = z0.shape[0]
    z0, z1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    rank = dist.get_rank() if gather and dist.is_available() and dist.is_initialized() else 0
    a0, a1 = (gather_with_grad(z0), gather_with_grad(z1)) if gather else (z0, z1)
    bank = torch.cat([a0, a1], dim=0)  # (2N, D): global view-0 embeddings, then view-1
    anchors = torch.cat([z0, z1], dim=0)  # (2n, D)
    logits = anchors @ bank.T / temperature  # (2n, 2N)
    N = a0.shape[0]
    local = torch.arange(n, device=z0.device) + rank * n  # global index of each local image
    self_idx = torch.cat([local, local + N])  # where each anchor sits in the bank
    pos_idx = torch.cat([local + N, local])  # its positive: the other view of the same image
    logits = logits.float()
    rows = torch.arange(2 * n, device=z0.device)
    logits[rows, self_idx] = float("-inf")
    if not decoupled:
        return F.cross_entropy(logits, pos_idx)
    pos = logits[rows, pos_idx]
    logits[rows, pos_idx] = float("-inf")
    return (torch.logsumexp(logits, dim=1) - pos).mean()


class ProjectionHead(nn.Module):
    """SimCLR v1 head: Linear -> BN -> ReLU -> Linear (-> BN optional), ``num_layers`` >= 2."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(d, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            d = hidden_dim
        layers.append(nn.Linear(d, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


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
    views = "pair"

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
