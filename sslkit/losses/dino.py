"""DINO's loss and centering (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers",
arXiv:2104.14294, eq. (1)-(2) and Algorithm 1).

Pure functions of tensors: the teacher and student head outputs, the running center and the temperatures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sslkit.losses.distributed import sum_over_ranks


def _stack(views: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """A list of V tensors (B, K), or an already stacked (V, B, K) tensor -> float32 (V, B, K)."""
    out = views if isinstance(views, torch.Tensor) else torch.stack(list(views))
    if out.ndim != 3:
        raise ValueError(f"expected views of shape (B, K) or a stack (V, B, K), got {tuple(out.shape)}")
    return out.float()


def dino_loss(teacher_out: Sequence[torch.Tensor] | torch.Tensor, student_out: Sequence[torch.Tensor] | torch.Tensor,
              center: torch.Tensor, teacher_temp: float, student_temp: float = 0.1) -> torch.Tensor:
    """DINO's cross-entropy between centred, sharpened teacher and student distributions.

    Paper: Caron et al. 2021, eq. (1)-(2) and Algorithm 1. Teacher view ``i`` and student view ``j`` form a
    pair unless ``i == j`` (the same crop): the teacher sees the global crops, which are the student's first
    views, so every global crop is matched against every *other* crop.

    Args:
        teacher_out: T tensors (B, K) or a stack (T, B, K): teacher head outputs (logits) of the global crops.
        student_out: S tensors (B, K) or a stack (S, B, K): student head outputs of all crops, globals first.
        center: (K,), (1, K) or (1, 1, K) running mean of the teacher outputs.
        teacher_temp: sharpening temperature of the teacher softmax (0.04 -> 0.07 in the paper).
        student_temp: temperature of the student softmax (0.1 in the paper).

    Returns:
        Scalar: ``sum_{i != j} mean_b -<softmax((t_i - C)/tau_t), log_softmax(s_j/tau_s)> / n_pairs``.

    Example:
        >>> t = [torch.randn(8, 256) for _ in range(2)]
        >>> s = [torch.randn(8, 256) for _ in range(6)]
        >>> loss = dino_loss(t, s, center=torch.zeros(256), teacher_temp=0.04)
    """
    t = _stack(teacher_out)  # (T, B, K)
    with torch.autocast(t.device.type, enabled=False):  # fp32 even under bf16 autocast: sums over K terms
        t_prob = F.softmax((t - center.reshape(1, 1, -1).float()) / teacher_temp, dim=-1)  # (T, B, K)
    return dino_loss_from_probs(t_prob, student_out, student_temp)


def dino_loss_from_probs(teacher_probs: Sequence[torch.Tensor] | torch.Tensor,
                         student_out: Sequence[torch.Tensor] | torch.Tensor, student_temp: float = 0.1) -> torch.Tensor:
    """:func:`dino_loss` with the teacher's target distributions given (centred and sharpened, or balanced by
    Sinkhorn-Knopp as in DINOv2): ``sum_{i != j} mean_b -<p_i, log_softmax(s_j/tau_s)> / n_pairs``.

    Args:
        teacher_probs: T tensors (B, K) or a stack (T, B, K), rows summing to 1.
        student_out: S tensors (B, K) or a stack (S, B, K): student head outputs of all crops, globals first.
        student_temp: temperature of the student softmax (0.1 in the paper).
    """
    t_prob = _stack(teacher_probs)  # (T, B, K)
    s = _stack(student_out)  # (S, B, K)
    if t_prob.shape[1:] != s.shape[1:]:
        raise ValueError(f"teacher {tuple(t_prob.shape)} and student {tuple(s.shape)} outputs differ in (B, K)")
    with torch.autocast(s.device.type, enabled=False):
        s_logp = F.log_softmax(s / student_temp, dim=-1)  # (S, B, K)
        ce = -torch.einsum("tbk,sbk->ts", t_prob, s_logp) / t_prob.shape[1]  # (T, S): batch-mean CE per pair
    same_view = torch.eye(*ce.shape, dtype=torch.bool, device=ce.device)  # teacher view i is student view i
    n_pairs = ce.shape[0] * ce.shape[1] - min(ce.shape)  # from shapes: no host sync, no torch.compile graph break
    if n_pairs == 0:
        raise ValueError(f"dino_loss needs at least one pair of different views; got {t_prob.shape[0]} teacher and "
                         f"{s.shape[0]} student view(s)")
    return ce.masked_fill(same_view, 0.0).sum() / n_pairs


def _global_sum_count(teacher_out: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the teacher outputs over views and samples (K,) and their number (), both over all ranks."""
    t = _stack(teacher_out)  # (T, B, K)
    stats = torch.cat([t.sum(dim=(0, 1)), t.new_full((1,), float(t.shape[0] * t.shape[1]))])  # (K + 1,)
    stats = sum_over_ranks(stats)  # one collective for both
    return stats[:-1], stats[-1]


@torch.no_grad()
def batch_center(teacher_out: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Mean teacher output over views and samples -> (1, K), over the global batch when distributed.

    The sum and the count are all-reduced together (the official code all-reduces the sum and divides by
    ``T * B * world_size``), so the mean is that of the concatenated batch even when ranks hold different
    numbers of rows, as iBOT's masked patches do. Zeros when there are no rows at all.
    """
    total, count = _global_sum_count(teacher_out)
    return (total / count.clamp(min=1)).unsqueeze(0)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: Sequence[torch.Tensor] | torch.Tensor,
                  momentum: float = 0.9) -> torch.Tensor:
    """EMA of the teacher's batch mean: ``momentum * center + (1 - momentum) * mean(teacher_out)``.

    Args:
        center: (1, K) current center (other shapes with K elements are kept as they are).
        teacher_out: T tensors (B, K) or a stack (T, B, K), the teacher outputs the loss was computed with.
        momentum: the center momentum m_c (0.9 in the paper).

    Returns:
        The new center, same shape and dtype as ``center``.

    Example:
        >>> c = update_center(torch.zeros(1, 256), [torch.randn(8, 256)] * 2, momentum=0.9)
    """
    total, count = _global_sum_count(teacher_out)
    mean = (total / count.clamp(min=1)).reshape(center.shape)
    new = center.float() * momentum + mean * (1.0 - momentum)
    # No rows anywhere (no image masked for iBOT in this step): nothing to average, the center stays.
    return torch.where(count > 0, new.to(center.dtype), center)


@torch.no_grad()
def teacher_entropy(teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Mean entropy (nats) of the centred, sharpened teacher distribution; a collapse monitor.

    Near ``log K``: uniform collapse (centering dominates); near 0: one-hot collapse (sharpening dominates).
    """
    logp = F.log_softmax((_stack(teacher_out) - center.reshape(1, 1, -1).float()) / teacher_temp, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()
