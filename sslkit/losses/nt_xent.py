"""NT-Xent, SimCLR's contrastive loss (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", arXiv:2002.05709, eq. (1)).

Under DDP, embeddings are gathered from all ranks with a differentiable all-gather, so every rank contrasts its
positives against the global batch, and the gradient that flows back equals the single-process gradient on the
concatenated batch (lightly #1176 and #1528 show the failure modes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslkit.losses.distributed import gather_with_grad
from sslkit.losses.distributed import rank as rank_of_process


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
    rank = rank_of_process() if gather else 0
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
