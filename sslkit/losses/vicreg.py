"""VICReg: Variance-Invariance-Covariance Regularization.

Paper: Bardes, Ponce & LeCun 2022 (ICLR), "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", arXiv:2105.04906. Numbers match lightly's ``VICRegLoss`` and the official code
(facebookresearch/vicreg).

For embeddings Z, Z' (N, D) of two views, with unbiased per-dimension variance and covariance over the
batch (``/(N - 1)``)::

    s(Z, Z') = 1/(N D) sum_{i,d} (Z_id - Z'_id)^2                         invariance (MSE)
    v(Z)     = 1/D sum_d relu(1 - sqrt(Var(Z_:,d) + eps))                 variance hinge
    c(Z)     = 1/D sum_{d != e} Cov(Z)_de^2                               covariance
    loss     = sim_weight * s + var_weight * (v(Z) + v(Z')) / 2 + cov_weight * (c(Z) + c(Z'))

The paper's eq. (6) sums the two variance terms; the official code and lightly *average* them (and sum the
covariance terms), and this module follows the code.

Under ``torch.distributed`` with ``gather=True``, v and c are computed on the global batch gathered with
:func:`~sslkit.losses.distributed.gather_with_grad`, so every rank holds the same global v and c. The
invariance term stays local: it is a per-sample mean, so the mean of the ranks' local MSEs is the global MSE
(equal local batch sizes), and DDP's division of the summed gradients by the world size turns each rank's
``1/n`` into the global ``1/N`` (the official code and lightly also keep it local; computing it on the
gathered batch would give the same numbers). So the mean over ranks of the returned loss, and DDP's averaged
gradients, equal one process on the concatenated batch.

Shapes: z0, z1 (n, D) local batch; the global batch N = world_size * n must be at least 2.

Example:
    >>> z0, z1 = torch.randn(32, 128), torch.randn(32, 128)
    >>> loss = vicreg_loss(z0, z1)
    >>> terms = vicreg_terms(z0, z1)  # {"invariance": ..., "variance": ..., "covariance": ...}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslkit.losses.distributed import gather_with_grad
from sslkit.losses.precision import full_precision


def _variance_hinge(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean over dims of ``relu(1 - sqrt(unbiased var + eps))`` for z (N, D)."""
    std = torch.sqrt(z.var(dim=0, unbiased=True) + eps)  # (D,)
    return F.relu(1.0 - std).mean()


def _covariance_penalty(z: torch.Tensor) -> torch.Tensor:
    """Sum of squared off-diagonal entries of the unbiased covariance of z (N, D), divided by D."""
    n, d = z.shape
    zc = z - z.mean(dim=0, keepdim=True)
    cov = zc.T @ zc / (n - 1)  # (D, D)
    off_diagonal = cov.masked_fill(torch.eye(d, dtype=torch.bool, device=z.device), 0.0)
    return off_diagonal.pow(2).sum() / d


def vicreg_terms(z0: torch.Tensor, z1: torch.Tensor, eps: float = 1e-4,
                 gather: bool = True) -> dict[str, torch.Tensor]:
    """The three unweighted VICReg terms, for logging and for :func:`vicreg_loss`.

    Args:
        z0, z1: (n, D) embeddings (expander outputs) of the two views, local batch.
        eps: added to the variance before the square root.
        gather: under torch.distributed, compute variance and covariance over the global batch.

    Returns:
        ``{"invariance": s(Z, Z'), "variance": (v(Z) + v(Z')) / 2, "covariance": c(Z) + c(Z')}``, scalars in
        float32 (float64 for float64 inputs), with gradients.

    Example:
        >>> z = torch.randn(16, 32)
        >>> vicreg_terms(z, z)["invariance"]  # -> tensor(0.)
    """
    if z0.ndim != 2 or z0.shape != z1.shape:
        raise ValueError(f"expected z0 and z1 of the same shape (n, D), got {tuple(z0.shape)} and "
                         f"{tuple(z1.shape)}")
    with torch.autocast(z0.device.type, enabled=False):  # fp32 statistics even under bf16 autocast
        z0, z1 = full_precision(z0), full_precision(z1)
        invariance = F.mse_loss(z0, z1)  # local: see the module docstring
        if gather:
            z0, z1 = gather_with_grad(z0), gather_with_grad(z1)
        if z0.shape[0] < 2:
            raise ValueError(f"VICReg needs a (global) batch of at least 2 samples, got {z0.shape[0]}")
        variance = 0.5 * (_variance_hinge(z0, eps) + _variance_hinge(z1, eps))
        covariance = _covariance_penalty(z0) + _covariance_penalty(z1)
    return {"invariance": invariance, "variance": variance, "covariance": covariance}


def vicreg_loss(z0: torch.Tensor, z1: torch.Tensor, sim_weight: float = 25.0, var_weight: float = 25.0,
                cov_weight: float = 1.0, eps: float = 1e-4, gather: bool = True) -> torch.Tensor:
    """VICReg loss ``sim_weight * s + var_weight * (v(Z) + v(Z'))/2 + cov_weight * (c(Z) + c(Z'))``.

    Args:
        z0, z1: (n, D) embeddings of the two views, local batch.
        sim_weight: lambda, weight of the invariance (MSE) term (25 in the paper).
        var_weight: mu, weight of the variance hinge (25).
        cov_weight: nu, weight of the covariance penalty (1).
        eps: added to the variance before the square root (1e-4).
        gather: under torch.distributed, compute variance and covariance over the global batch.

    Returns:
        Scalar loss (float32 under autocast).

    Example:
        >>> loss = vicreg_loss(torch.randn(32, 128), torch.randn(32, 128))
    """
    t = vicreg_terms(z0, z1, eps=eps, gather=gather)
    return sim_weight * t["invariance"] + var_weight * t["variance"] + cov_weight * t["covariance"]
