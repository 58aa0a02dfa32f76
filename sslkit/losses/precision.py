"""The arithmetic losses run in: statistics and softmaxes over many terms stay in full precision under autocast."""

from __future__ import annotations

import torch


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 are kept (fp64 lets tests compare tightly)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
