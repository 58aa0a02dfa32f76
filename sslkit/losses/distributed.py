"""Collectives that losses use to see the global batch under ``torch.distributed``.

Every helper is the identity in a single process, so a loss written with them runs unchanged on a laptop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if world_size() > 1 else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (n, ...) from all ranks -> (world * n, ...), rank order; gradients flow back to every rank.

    The backward of the all-gather sums the gradients that all ranks send to each slice, so a loss computed on
    the gathered batch on every rank, with DDP's gradient averaging, gives the single-process gradient of the
    concatenated batch.
    """
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (n, ...) from all ranks without a gradient path (targets of a momentum encoder)."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over all ranks (a new tensor; ``x`` itself in a single process). No gradient path.

    Sums and counts reduced together give means over the global batch even when ranks hold different numbers
    of items (iBOT's masked patches), which a mean of per-rank means does not.
    """
    if world_size() == 1:
        return x
    out = x.clone()
    dist.all_reduce(out)
    return out
