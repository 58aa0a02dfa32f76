"""Sinkhorn-Knopp centering of the teacher's prototype scores, as DINOv2 uses it in place of DINO's running
center (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision", arXiv:2304.07193,
Sec. 4; the official ``SinkhornKnoppTeacher.sinkhorn_knopp_teacher`` in facebookresearch/dinov2, itself
SwAV's ``distributed_sinkhorn``, Caron et al. 2020, arXiv:2006.09882).

For teacher logits L (B, K) of the global batch of B samples over K prototypes and a temperature tau, with
``Q = exp(L / tau)^T`` (K, B) normalised to total mass 1, each iteration rescales::

    Q_kb <- Q_kb / (K * sum_b' Q_kb')      rows (prototypes): each prototype gets mass 1/K
    Q_kb <- Q_kb / (B * sum_k' Q_k'b)      columns (samples): each sample gets mass 1/B

and the result is ``(B * Q)^T`` (B, K): after at least one iteration every row (sample) is a distribution over
the prototypes, and the prototypes' total masses approach the uniform B/K as the iterations go on (the
columns are normalised last, so they are exact and the prototype marginals are approximate).

Under ``torch.distributed`` (``distributed=True``) the sums over samples, the total mass and B itself are
all-reduced (SUM), so each rank's rows are the corresponding rows of one process running on the concatenated
batch; the ranks may hold different numbers of samples (DINOv2's patch version all-reduces the count of
masked patches for this reason).

Difference from the official code, floating point only: ``exp`` is taken of ``L / tau`` minus, per prototype,
its maximum over the global batch (one all-reduce MAX). The first row normalisation cancels any per-prototype
factor, so the result is the same number, but large ``L / tau`` (> 88 in float32) no longer overflows to inf
and NaN. With ``n_iterations=0`` there is no row normalisation, and the shift is the global maximum (a
single constant, cancelled by the total-mass normalisation): the result is then ``B * softmax`` over all
B * K entries together, not a per-sample softmax.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sslkit.losses.precision import full_precision


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3,
                   distributed: bool = True) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp teacher targets: balanced soft assignments of samples to prototypes.

    Paper: Oquab et al. 2023 (DINOv2), Sec. 4 "Sinkhorn-Knopp centering"; code: ``SinkhornKnoppTeacher`` in
    facebookresearch/dinov2. See the module docstring for the formula. No gradient (teacher targets);
    computed in float32 even under bf16/fp16 autocast (float64 inputs stay float64).

    Args:
        teacher_logits: (B, K) teacher head outputs of this rank's samples (class tokens, or the masked patch
            tokens flattened to (M, K) for iBOT).
        teacher_temp: temperature tau (0.04 -> 0.07 in DINOv2).
        n_iterations: Sinkhorn-Knopp iterations (3 in DINOv2). 0 gives ``B * softmax`` over all entries.
        distributed: under ``torch.distributed``, all-reduce the sums so that the targets are those of the
            global batch (default). ``False``: each rank normalises its own batch alone.

    Returns:
        (B, K) float32 (float64 for float64 input); with ``n_iterations >= 1`` each row sums to 1.

    Example:
        >>> logits = torch.randn(32, 1024)
        >>> targets = sinkhorn_knopp(logits, teacher_temp=0.07)  # (32, 1024), rows sum to 1
        >>> loss = -(targets * torch.log_softmax(torch.randn(32, 1024) / 0.1, dim=-1)).sum(-1).mean()
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"expected teacher logits of shape (B, K), got {tuple(teacher_logits.shape)}")
    if n_iterations < 0:
        raise ValueError(f"n_iterations must be >= 0, got {n_iterations}")
    reduce = distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    with torch.autocast(teacher_logits.device.type, enabled=False):
        scores = full_precision(teacher_logits) / teacher_temp  # (B, K)
        n_local, k = scores.shape
        # per-prototype maximum over the global batch; -inf for a rank without samples
        shift = scores.amax(dim=0) if n_local > 0 else scores.new_full((k,), float("-inf"))  # (K,)
        if reduce:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX)
        if n_iterations == 0:
            shift = shift.max()  # one constant: no row normalisation below would cancel a per-row one
        q = torch.exp(scores - shift).T  # (K, B): Q is K-by-B as in the paper's notation
        # total mass and the number of samples, summed over ranks in one collective
        totals = torch.stack([q.sum(), q.new_tensor(float(n_local))])
        if reduce:
            dist.all_reduce(totals)
        total_mass, n_global = totals[0], totals[1]
        q = q / total_mass
        for _ in range(n_iterations):
            row_sums = q.sum(dim=1, keepdim=True)  # (K, 1): mass of each prototype
            if reduce:
                dist.all_reduce(row_sums)
            q = q / row_sums / k
            q = q / q.sum(dim=0, keepdim=True) / n_global  # (1, B): mass of each sample, local
        return (q * n_global).T
