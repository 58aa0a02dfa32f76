"""Fault-injection helpers: an objective that goes non-finite on chosen steps."""

from dataclasses import dataclass, field

from sslkit.objectives.simclr import SimCLR, SimCLRConfig
from sslkit.plugins import load_all
from sslkit.registry import OBJECTIVES

load_all()


@dataclass
class FaultySimCLRConfig(SimCLRConfig):
    name: str = "faulty_simclr"
    nan_loss_steps: list[int] = field(default_factory=list)  # the loss is NaN at these steps
    inf_grad_steps: list[int] = field(default_factory=list)  # a gradient is Inf at these steps
    raise_on_rank: int = -1  # this rank raises RuntimeError at step `raise_at_step`
    raise_at_step: int = 0


class FaultySimCLR(SimCLR):
    Config = FaultySimCLRConfig

    def forward(self, views, step=0):
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank == self.cfg.raise_on_rank and step == self.cfg.raise_at_step:
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        out = super().forward(views, step)
        if step in self.cfg.nan_loss_steps:
            out["loss"] = out["loss"] * float("nan")
        return out

    def on_after_backward(self, step):
        if step in self.cfg.inf_grad_steps:
            p = next(self.head.parameters())
            p.grad.view(-1)[0] = float("inf")


if "faulty_simclr" not in OBJECTIVES:
    OBJECTIVES.register("faulty_simclr", config=FaultySimCLRConfig, help="test only")(FaultySimCLR)
