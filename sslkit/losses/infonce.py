"""InfoNCE as in MoCo v3: queries against the momentum keys of the global batch.

Paper: Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers",
arXiv:2104.02057, Algorithm 1 and the official code (facebookresearch/moco-v3, ``MoCo.contrastive_loss``).

For queries q (n, D) of the online branch (with gradient) and keys k (n, D) of the momentum branch, on a
rank r of W ranks, with K = the keys of all ranks (W n, D)::

    logits = normalize(q) @ normalize(K)^T / T              (n, W n)
    labels = arange(n) + r * n                              the key of the same image
    loss   = CrossEntropy(logits, labels) * 2 T             (mean over the n local queries)

The ``2 T`` factor is the paper's: it makes the gradient's scale independent of the temperature. Every
other image's key in the global batch is a negative; there is no queue (unlike MoCo v1/v2) and, unlike
SimCLR's NT-Xent, no query-query negatives.

Keys are gathered with :func:`~sslkit.losses.distributed.gather_no_grad` and the loss treats k as a
constant (``k.detach()``, also in a single process, so the gradient does not depend on the world size). The
loss is a mean over local queries, so the mean over ranks is the loss of one process on the concatenated
batch, and DDP's averaged gradients equal that process's gradients.

Example:
    >>> q0, q1 = torch.randn(8, 256), torch.randn(8, 256)  # predictor outputs of the two views
    >>> k0, k1 = torch.randn(8, 256), torch.randn(8, 256)  # momentum encoder outputs, no grad
    >>> loss = moco_v3_symmetric(q0, q1, k0, k1, temperature=0.2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslkit.losses.distributed import gather_no_grad, rank
from sslkit.losses.precision import full_precision


def moco_v3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo v3's contrastive loss ``ctr(q, k)`` (Algorithm 1), keys from all ranks as negatives.

    Args:
        q: (n, D) queries (predictor outputs of one view), with gradient.
        k: (n, D) keys (momentum-encoder outputs of the other view, row i the same image as ``q[i]``);
            treated as constants.
        temperature: T (0.2 for ViT in the paper, 1.0 for ResNet-50).

    Returns:
        Scalar ``2 T * mean_i -log softmax(q_i . K / T)[rank * n + i]``, float32 under autocast.

    Example:
        >>> loss = moco_v3_loss(torch.randn(8, 128), torch.randn(8, 128), temperature=0.2)
    """
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"expected q and k of the same shape (n, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with torch.autocast(q.device.type, enabled=False):  # fp32 logits even under bf16 autocast
        q = F.normalize(full_precision(q), dim=1)
        k = F.normalize(full_precision(k.detach()), dim=1)
        keys = gather_no_grad(k)  # (W n, D)
        logits = q @ keys.T / temperature  # (n, W n)
        n = q.shape[0]
        labels = torch.arange(n, device=q.device) + rank() * n
        return F.cross_entropy(logits, labels) * (2 * temperature)


def moco_v3_symmetric(q0: torch.Tensor, q1: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor,
                      temperature: float = 0.2) -> torch.Tensor:
    """Symmetrised MoCo v3 loss ``ctr(q0, k1) + ctr(q1, k0)`` (summed, as in Algorithm 1).

    Args:
        q0, q1: (n, D) queries of views 0 and 1.
        k0, k1: (n, D) momentum keys of views 0 and 1.
        temperature: T.

    Returns:
        Scalar loss.

    Example:
        >>> q0, q1, k0, k1 = (torch.randn(8, 64) for _ in range(4))
        >>> loss = moco_v3_symmetric(q0, q1, k0, k1, temperature=0.2)
    """
    return moco_v3_loss(q0, k1, temperature) + moco_v3_loss(q1, k0, temperature)
