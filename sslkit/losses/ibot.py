"""iBOT's masked-patch loss (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer",
arXiv:2111.07832, eq. (2) "L_MIM"), in the form DINOv2 uses it (Oquab et al. 2023, arXiv:2304.07193;
``iBOTPatchLoss`` in facebookresearch/dinov2). Numbers match lightly's ``IBOTPatchLoss``.

The student sees an image with some patches masked; the teacher sees it unmasked. For image b with patches
n = 1..N, mask m_bn (True: masked for the student), teacher patch distributions P_t (B, N, K) and student
patch logits S (B, N, K)::

    ce_bn = -sum_k P_t[b, n, k] * log_softmax(S[b, n] / tau_s)_k
    loss  = 1/B sum_b  (1 / max(1, sum_n m_bn)) * sum_{n: m_bn} ce_bn

i.e. the cross-entropy averaged over the masked patches of each image, then over images. An image without a
masked patch contributes 0 and still counts in the 1/B (as in DINOv2 and lightly).

The teacher distributions are made beforehand, DINO-style by :func:`ibot_teacher_probs` (centred softmax, a
separate patch center) or DINOv2-style by :func:`sslkit.losses.sinkhorn.sinkhorn_knopp` on the masked
patches. Two equal forms of the loss:

- :func:`ibot_patch_loss`: dense (B, N, K) inputs and the (B, N) mask (DINOv2's ``forward``); no host sync.
- :func:`ibot_patch_loss_masked`: only the M masked patches, flattened (M, K) in the mask's row-major order,
  i.e. ``x[mask]`` (DINOv2's ``forward_masked`` and lightly's ``IBOTPatchLoss``); cheaper for large K.

Lightly's ``IBOTPatchLoss(output_dim=K, teacher_temp=tt, student_temp=ts)(t, s, mask)``, with its center
buffer C, equals ``ibot_patch_loss_masked(ibot_teacher_probs(t, C, tt), s, mask, ts)`` (lightly then updates
C in place; that update is not part of the loss value). Lightly computes the weights 1 / n_masked in float32
whatever the input dtype, so with float64 inputs the two agree to float64 precision only where n_masked is a
power of two (2e-7 relative otherwise); sslkit keeps the inputs' precision.

The loss is per image, so under DDP with the same number of images per rank the mean over ranks of the
local losses is the global loss: nothing is gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslkit.losses.precision import full_precision


def _flat_mask(student_masks: torch.Tensor) -> torch.Tensor:
    """(B, N) or (B, H, W) bool -> (B, N) bool."""
    if student_masks.ndim not in (2, 3):
        raise ValueError(f"expected a mask of shape (B, N) or (B, H, W), got {tuple(student_masks.shape)}")
    return student_masks.reshape(student_masks.shape[0], -1).bool()


@torch.no_grad()
def ibot_teacher_probs(teacher_patch_logits: torch.Tensor, center: torch.Tensor,
                       teacher_temp: float) -> torch.Tensor:
    """iBOT's teacher targets: ``softmax((t - center) / teacher_temp)`` over the last dimension K.

    The centred, sharpened teacher distribution of iBOT eq. (2) (DINOv2's ``softmax_center_teacher``), with a
    patch center of its own (EMA of the teacher's patch outputs, e.g. :func:`sslkit.losses.dino.update_center`
    on the masked patches). No gradient; float32 under autocast (float64 kept).

    Args:
        teacher_patch_logits: (..., K), e.g. (B, N, K) dense or (M, K) masked patches.
        center: K elements, e.g. (K,) or (1, K).
        teacher_temp: sharpening temperature (0.04 -> 0.07).

    Returns:
        Same shape as ``teacher_patch_logits``: distributions over K.

    Example:
        >>> p = ibot_teacher_probs(torch.randn(8, 196, 512), torch.zeros(512), teacher_temp=0.04)
    """
    with torch.autocast(teacher_patch_logits.device.type, enabled=False):
        t = full_precision(teacher_patch_logits)
        return F.softmax((t - center.reshape(-1).to(t.dtype)) / teacher_temp, dim=-1)


def ibot_patch_loss(teacher_patch_probs: torch.Tensor, student_patch_logits: torch.Tensor,
                    student_masks: torch.Tensor, student_temp: float = 0.1) -> torch.Tensor:
    """iBOT's masked-patch cross-entropy on dense patch tensors (DINOv2's ``iBOTPatchLoss.forward``).

    Paper: Zhou et al. 2022, eq. (2); see the module docstring for the formula. Every patch's cross-entropy is
    computed and the unmasked ones are dropped (no boolean indexing, so no host sync); for a large K prefer
    :func:`ibot_patch_loss_masked`. Float32 under autocast (float64 kept).

    Args:
        teacher_patch_probs: (B, N, K) teacher distributions (:func:`ibot_teacher_probs` or Sinkhorn-Knopp);
            values at unmasked patches are ignored.
        student_patch_logits: (B, N, K) student head outputs of the masked views.
        student_masks: (B, N) or (B, H, W) bool, True where the student's patch was masked.
        student_temp: temperature of the student softmax (0.1).

    Returns:
        Scalar: mean over images of the mean cross-entropy over the image's masked patches.

    Example:
        >>> t = ibot_teacher_probs(torch.randn(4, 196, 512), torch.zeros(512), teacher_temp=0.04)
        >>> mask = torch.rand(4, 196) < 0.3
        >>> loss = ibot_patch_loss(t, torch.randn(4, 196, 512), mask)
    """
    if teacher_patch_probs.ndim != 3 or teacher_patch_probs.shape != student_patch_logits.shape:
        raise ValueError(f"expected teacher and student patch tensors of one shape (B, N, K), got "
                         f"{tuple(teacher_patch_probs.shape)} and {tuple(student_patch_logits.shape)}")
    mask = _flat_mask(student_masks)
    if mask.shape != teacher_patch_probs.shape[:2]:
        raise ValueError(f"mask {tuple(student_masks.shape)} does not hold the (B, N) = "
                         f"{tuple(teacher_patch_probs.shape[:2])} patches")
    with torch.autocast(student_patch_logits.device.type, enabled=False):
        t, s = full_precision(teacher_patch_probs), full_precision(student_patch_logits)
        ce = -(t * F.log_softmax(s / student_temp, dim=-1)).sum(dim=-1)  # (B, N)
        ce = ce.masked_fill(~mask, 0.0)  # (B, N): masked patches only
        per_image = ce.sum(dim=1) / mask.sum(dim=1).clamp(min=1).to(ce.dtype)  # (B,)
        return per_image.mean()


def ibot_patch_loss_masked(teacher_probs_masked: torch.Tensor, student_logits_masked: torch.Tensor,
                           student_masks: torch.Tensor, student_temp: float = 0.1) -> torch.Tensor:
    """iBOT's masked-patch cross-entropy on the masked patches only (DINOv2's ``forward_masked``, lightly).

    Same value as :func:`ibot_patch_loss` on dense tensors whose masked rows these are:
    ``ibot_patch_loss_masked(t[mask], s[mask], mask) == ibot_patch_loss(t, s, mask)``.

    Args:
        teacher_probs_masked: (M, K) teacher distributions of the M masked patches, in the order of
            ``x[mask]`` (image by image, patches in row-major order).
        student_logits_masked: (M, K) student head outputs of the same patches.
        student_masks: (B, N) or (B, H, W) bool with exactly M True entries; gives each patch's image and
            the image's number of masked patches.
        student_temp: temperature of the student softmax (0.1).

    Returns:
        Scalar: ``1/B sum_m ce_m / n_masked(image of m)``.

    Example:
        >>> mask = torch.rand(4, 14, 14) < 0.3
        >>> m = int(mask.sum())
        >>> t = ibot_teacher_probs(torch.randn(m, 512), torch.zeros(512), teacher_temp=0.04)
        >>> loss = ibot_patch_loss_masked(t, torch.randn(m, 512), mask)
    """
    if teacher_probs_masked.ndim != 2 or teacher_probs_masked.shape != student_logits_masked.shape:
        raise ValueError(f"expected teacher and student masked patches of one shape (M, K), got "
                         f"{tuple(teacher_probs_masked.shape)} and {tuple(student_logits_masked.shape)}")
    mask = _flat_mask(student_masks)
    with torch.autocast(student_logits_masked.device.type, enabled=False):
        t, s = full_precision(teacher_probs_masked), full_precision(student_logits_masked)
        ce = -(t * F.log_softmax(s / student_temp, dim=-1)).sum(dim=-1)  # (M,)
        weights = (1.0 / mask.sum(dim=1, keepdim=True).clamp(min=1).to(ce.dtype)).expand_as(mask)[mask]  # (M,)
        if weights.shape != ce.shape:
            raise ValueError(f"the mask has {weights.numel()} masked patches, the inputs {ce.numel()}")
        return (ce * weights).sum() / mask.shape[0]
