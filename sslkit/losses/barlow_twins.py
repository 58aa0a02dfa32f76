"""Barlow Twins: redundancy reduction through the cross-correlation of two views.

Paper: Zbontar, Jing, Misra, LeCun & Deny 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", arXiv:2103.03230. Numbers match lightly's ``BarlowTwinsLoss`` in a single process.

For embeddings Z, Z' (N, D) of the two views::

    Zn   = (Z - mean_N(Z)) / sqrt(Var_N(Z) + eps)         per dimension, biased variance (batch norm)
    C    = Zn^T Zn' / N                                   (D, D) cross-correlation
    loss = sum_i (1 - C_ii)^2 + lambda_offdiag * sum_{i != j} C_ij^2

The normalisation is a parameter-free batch norm in training mode, as in the official code (BatchNorm1d
with ``affine=False``, eps 1e-5) and lightly (``F.batch_norm``): biased variance plus eps 1e-5, where the
paper's pseudo-code divides by ``torch.std`` (unbiased, no eps). ``lambda_offdiag`` defaults to the paper's
5e-3 (the official code uses 0.0051).

Under ``torch.distributed`` with ``gather=True`` both embeddings are gathered with
:func:`~sslkit.losses.distributed.gather_with_grad` and every rank computes the same global loss (the
official code's SyncBatchNorm and all-reduced C). The all-gather's backward sums the gradients of all ranks,
and DDP divides by the world size, which gives the single-process gradient. (lightly instead normalises each
rank's local batch and averages the per-rank C, which is not the global-batch statistic.)

Shapes: z0, z1 (n, D) local batch; N = world_size * n.

Example:
    >>> z0, z1 = torch.randn(64, 256), torch.randn(64, 256)
    >>> loss = barlow_twins_loss(z0, z1, lambda_offdiag=5e-3)
"""

from __future__ import annotations

import torch

from sslkit.losses.distributed import gather_with_grad
from sslkit.losses.precision import full_precision

BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm1d's default, used by the official code and lightly


def _batch_standardise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-dimension ``(z - mean) / sqrt(biased var + eps)`` over the batch of z (N, D)."""
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def barlow_twins_loss(z0: torch.Tensor, z1: torch.Tensor, lambda_offdiag: float = 5e-3, gather: bool = True,
                      eps: float = BATCH_NORM_EPS) -> torch.Tensor:
    """Barlow Twins loss of the cross-correlation of the batch-normalised embeddings.

    Args:
        z0, z1: (n, D) projector outputs of the two views, local batch.
        lambda_offdiag: weight of the redundancy-reduction (off-diagonal) term.
        gather: under torch.distributed, normalise and correlate over the global batch.
        eps: added to the batch variance in the normalisation.

    Returns:
        Scalar ``sum_i (1 - C_ii)^2 + lambda_offdiag * sum_{i != j} C_ij^2``, float32 under autocast.

    Example:
        >>> loss = barlow_twins_loss(torch.randn(32, 64), torch.randn(32, 64))
    """
    if z0.ndim != 2 or z0.shape != z1.shape:
        raise ValueError(f"expected z0 and z1 of the same shape (n, D), got {tuple(z0.shape)} and "
                         f"{tuple(z1.shape)}")
    with torch.autocast(z0.device.type, enabled=False):  # fp32 statistics even under bf16 autocast
        z0, z1 = full_precision(z0), full_precision(z1)
        if gather:
            z0, z1 = gather_with_grad(z0), gather_with_grad(z1)
        n, d = z0.shape
        c = _batch_standardise(z0, eps).T @ _batch_standardise(z1, eps) / n  # (D, D)
        eye = torch.eye(d, dtype=torch.bool, device=c.device)
        on_diagonal = (1.0 - torch.diagonal(c)).pow(2).sum()
        off_diagonal = c.masked_fill(eye, 0.0).pow(2).sum()
        return on_diagonal + lambda_offdiag * off_diagonal
