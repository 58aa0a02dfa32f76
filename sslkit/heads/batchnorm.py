"""BatchNorm over the global batch under ``torch.distributed``, on any device.

BatchNorm's batch statistics make a sample's output depend on the other samples of its batch, so a
projection head with BatchNorm (SimCLR, BYOL, VICReg, Barlow Twins, MoCo v3) or a ResNet computes something
else on each half of a batch than on the whole. Synchronised BatchNorm normalises with the statistics of the
global batch, which makes N processes compute what one process computes on the concatenated batch.
``torch.nn.SyncBatchNorm`` does this on GPUs only; :class:`GlobalBatchNorm` does it on any device (the CPU with
gloo), and :func:`convert_sync_batchnorm` picks one or the other.
"""

from __future__ import annotations

import torch
from torch import nn

from sslkit.losses.distributed import world_size
from sslkit.losses.precision import full_precision

SYNC_BN_DEVICES = ("cuda", "hpu", "xpu")  # where torch.nn.SyncBatchNorm runs (its forward refuses the others)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1-d, 2-d or 3-d input) whose training statistics are those of the batch over all ranks.

    Each rank's per-channel count, mean and sum of squared deviations are all-gathered (one collective, with
    a gradient path) and combined with Chan et al.'s parallel formula, so a rank's output is its rows of one
    BatchNorm over the concatenated batch, and so are the gradients (DDP averages them) and the running
    statistics (unbiased variance from the global count, as BatchNorm). In a single process, in eval mode and
    without training statistics it is ``torch.nn.BatchNorm``. Parameters and buffers keep BatchNorm's names,
    so checkpoints move between world sizes. Statistics are computed in float32 (as under autocast; float64
    is kept).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's name
        if input.dim() < 2:
            raise ValueError(f"expected input of shape (N, C, ...), got {tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_gather

        c = x.shape[1]
        dims = [0, *range(2, x.dim())]  # every dimension but the channels
        shape = (1, c) + (1,) * (x.dim() - 2)
        xf = full_precision(x)  # float32 (float64 kept)
        n = xf.numel() // c
        mean = xf.mean(dim=dims)  # (C,) this rank's
        m2 = (xf - mean.view(shape)).pow(2).sum(dim=dims)  # (C,) sum of squared deviations, this rank's
        stats = torch.stack(all_gather(torch.cat([mean, m2, mean.new_full((1,), float(n))])))  # (W, 2C + 1)
        means, m2s, counts = stats[:, :c], stats[:, c:2 * c], stats[:, 2 * c:]  # (W, C), (W, C), (W, 1)
        total = counts.sum()
        g_mean = (means * counts).sum(dim=0) / total  # (C,)
        g_m2 = (m2s + counts * (means - g_mean).pow(2)).sum(dim=0)  # (C,)
        var = g_m2 / total  # biased, for normalising
        if self.track_running_stats:
            self._update_running_stats(g_mean.detach(), (g_m2 / (total - 1).clamp(min=1)).detach())
        y = (xf - g_mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """``module`` with every BatchNorm synchronised over the ranks: ``torch.nn.SyncBatchNorm`` on GPUs (its fused
    kernels), :class:`GlobalBatchNorm` elsewhere. Weights, buffers and their names are kept."""
    if device_type in SYNC_BN_DEVICES:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global(module)


def _to_global(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device="meta")
        # The same tensors, not copies: device, dtype, requires_grad and the values carry over.
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(out, name, getattr(module, name))
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_global(child))
    return out
