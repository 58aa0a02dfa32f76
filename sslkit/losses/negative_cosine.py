"""Negative cosine similarity: the loss of BYOL and SimSiam.

Papers: Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning"
(arXiv:2006.07733); Chen & He 2021, "Exploring Simple Siamese Representation Learning" (arXiv:2011.10566).

Formula, for predictions p (n, D) of the online branch and targets z (n, D)::

    negative_cosine(p, z) = -1/n sum_i <p_i, z_i> / (|p_i| |z_i|)
    byol_loss(p0, p1, z0, z1) = (negative_cosine(p0, z1) + negative_cosine(p1, z0)) / 2

The stop-gradient on the targets is the caller's job (``z.detach()``, or a momentum encoder under
``torch.no_grad``): the loss is a plain function of both arguments, so its gradient w.r.t. ``z`` exists if
the caller lets it.

BYOL's paper writes the loss as ``|p/|p| - z/|z||^2 = 2 - 2 cos(p, z)`` per sample and sums the two
symmetric terms, i.e. ``L_paper = 4 + 4 * byol_loss``: an affine transform with the same minimiser, but the
gradients are 4x larger (LARS's trust ratio cancels that factor; SGD or Adam with the paper's learning rate
do not see the same step). ``byol_loss`` is SimSiam's symmetrised form ``D(p1, z2)/2 + D(p2, z1)/2``, the
one lightly uses.

Example:
    >>> p0, p1 = torch.randn(8, 256), torch.randn(8, 256)
    >>> z0, z1 = torch.randn(8, 256), torch.randn(8, 256)
    >>> loss = byol_loss(p0, p1, z0.detach(), z1.detach())
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslkit.losses.precision import full_precision

COSINE_EPS = 1e-8  # the norm clamp of torch.nn.functional.cosine_similarity (and of lightly's loss)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-cos(p_i, z_i)``.

    Args:
        p: (n, D) predictions (online branch).
        z: (n, D) targets; detach them before the call for BYOL/SimSiam's stop-gradient.

    Returns:
        Scalar in [-1, 1], computed in float32 (or float64 for float64 inputs) even under autocast.

    Example:
        >>> p = torch.randn(4, 16)
        >>> negative_cosine(p, 2 * p)  # -> tensor(-1.)
    """
    if p.ndim != 2 or p.shape != z.shape:
        raise ValueError(f"expected p and z of the same shape (n, D), got {tuple(p.shape)} and {tuple(z.shape)}")
    with torch.autocast(p.device.type, enabled=False):
        cos = F.cosine_similarity(full_precision(p), full_precision(z), dim=1, eps=COSINE_EPS)  # (n,)
        return -cos.mean()


def byol_loss(p0: torch.Tensor, p1: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """Symmetrised negative cosine: view 0's prediction against view 1's target and vice versa, averaged.

    Args:
        p0, p1: (n, D) predictions of views 0 and 1.
        z0, z1: (n, D) targets of views 0 and 1 (detached by the caller).

    Returns:
        Scalar ``(negative_cosine(p0, z1) + negative_cosine(p1, z0)) / 2``; BYOL's ``2 - 2 cos`` summed over
        both directions is ``4 + 4 * byol_loss``.

    Example:
        >>> p0, p1, z0, z1 = (torch.randn(8, 64) for _ in range(4))
        >>> loss = byol_loss(p0, p1, z0, z1)
    """
    return 0.5 * (negative_cosine(p0, z1) + negative_cosine(p1, z0))
