"""The online linear probe: a linear classifier trained next to pretraining on detached features.

With ``eval.online_probe: true`` and a labelled dataset, :class:`OnlineProbe` trains, on every step, a linear layer
on the features that the objective's eval encoder (DINO: the teacher) gives the batch's first view, in eval mode and
without gradients (:func:`sslkit.engine.health.step_features`), against the batch's labels. The features are
standardised by a ``BatchNorm1d`` without affine parameters (as in MAE's linear probe, so one learning rate suits any
feature scale), and the layer has its own AdamW optimiser (``eval.online_probe_lr``). Nothing flows back into the
encoder, and training is the same with the probe on or off.

It logs ``probe_loss`` and ``probe_train_top1`` (the probe's accuracy on the batch before its update) with the loss,
and its top-1/top-5 on ``data.eval_split`` (``probe_top1``, ``probe_top5``; the k-NN monitor's query subset, at the
training view size) whenever the k-NN monitor runs (every ``eval.knn_every`` epochs, or every epoch when it is off)
and when training ends. Its weights and optimiser state go into the checkpoint, so a resumed run continues exactly.
The probe is cheap, but its features cost one more forward pass of one view per step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sslkit.engine.callbacks import Callback
from sslkit.engine.health import step_features

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from sslkit.engine.context import TrainContext


def probe_head(dim: int, num_classes: int) -> nn.Module:
    """Standardise the ``(B, dim)`` features (no affine parameters), then one linear layer to ``num_classes``."""
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))


class LinearProbe:
    """The probe's model and optimiser, without the engine: :meth:`update` takes one step on a labelled batch.

    Example:
        >>> p = LinearProbe(dim=16, num_classes=3, lr=1e-3)
        >>> loss, top1 = p.update(torch.randn(8, 16), torch.randint(0, 3, (8,)))
    """

    def __init__(self, dim: int, num_classes: int, lr: float, device: str | torch.device = "cpu") -> None:
        self.num_classes = num_classes
        self.head = probe_head(dim, num_classes).to(device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=0.0)

    def update(self, feats: torch.Tensor, labels: torch.Tensor, world: int = 1) -> tuple[float, float] | None:
        """One AdamW step on ``(B, D)`` features and ``(B,)`` labels (rows outside ``0..C-1`` are left out); returns
        (loss, top-1 % before the step), or None with fewer than 2 labelled rows. With ``world > 1`` the gradients
        are averaged over the processes, so every rank holds the same probe."""
        keep = (labels >= 0) & (labels < self.num_classes)
        x, y = feats.detach().float()[keep], labels[keep].long()
        enough = torch.tensor([float(len(y) >= 2)], device=x.device)
        if world > 1:  # every rank takes the same branch, so the gradient all-reduce below cannot hang
            import torch.distributed as dist

            dist.all_reduce(enough, op=dist.ReduceOp.MIN)
        if not enough.item():
            return None
        self.head.train()
        logits = self.head(x)  # (B, C)
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            for p in self.head.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= world
        self.optimizer.step()
        return float(loss.detach()), 100.0 * float((logits.argmax(1) == y).float().mean())

    @torch.no_grad()
    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """``(N, D) -> (N, C)`` with the standardisation's running statistics."""
        self.head.eval()
        dev = next(self.head.parameters()).device
        return self.head(feats.float().to(dev)).cpu()

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])


class OnlineProbe(Callback):
    """The callback of the module notes. Place it before ``MetricsLogger``, whose row carries its training figures."""

    def __init__(self, dim: int, num_classes: int, lr: float, state: dict[str, Any] | None = None) -> None:
        self.dim, self.num_classes, self.lr = dim, num_classes, lr
        self.state = state
        self.probe: LinearProbe | None = None
        self.view_size: int | None = None  # the training view size; the eval split is scored at it

    @classmethod
    def from_config(cls, cfg: DictConfig, objective: nn.Module, dataset: Any, ckpt: dict | None = None,
                    say: Any = print) -> OnlineProbe | None:
        """The probe when the recipe asks for one (``eval.online_probe``) and the dataset has classes; else None
        (``say`` reports why when the recipe asked)."""
        if not cfg.eval.online_probe:
            return None
        classes = getattr(dataset, "classes", None) or []
        if not classes:
            say("note: eval.online_probe is on but the training dataset has no classes (no labels); no probe.")
            return None
        dim = int(objective.eval_encoder().dim)
        return cls(dim, len(classes), float(cfg.eval.online_probe_lr), (ckpt or {}).get("online_probe"))

    def on_train_start(self, ctx: TrainContext) -> None:
        self.probe = LinearProbe(self.dim, self.num_classes, self.lr, ctx.fabric.device)
        if self.state is not None:
            self.probe.load_state_dict(self.state)
            self.view_size = self.state.get("view_size")

    def on_step_end(self, ctx: TrainContext, out: dict[str, torch.Tensor]) -> None:
        inputs = ctx.step_inputs
        feats = step_features(ctx, ctx.objective.eval_encoder())
        if feats is None or inputs is None or self.probe is None:
            return
        self.view_size = int(inputs[0][0].shape[-1])
        got = self.probe.update(feats, torch.as_tensor(inputs[1]).to(feats.device), ctx.world)
        if got is not None:
            out["probe_loss"], out["probe_train_top1"] = torch.tensor(got[0]), torch.tensor(got[1])

    def score(self, ctx: TrainContext) -> dict[str, float] | None:
        """Top-1/top-5 (%) on the k-NN monitor's query subset of ``data.eval_split`` (rank 0; None elsewhere)."""
        from sslkit.data import subset_dataset
        from sslkit.eval.features import extract_features
        from sslkit.eval.linear import topk_accuracy
        from sslkit.run import build_dataset, eval_image_size

        result = None
        if ctx.is_main and self.probe is not None:
            cfg, ev = ctx.cfg, ctx.cfg.eval
            ds = subset_dataset(build_dataset(cfg, cfg.data.eval_split), ev.monitor_test_subset or ev.knn_test_subset,
                                seed=cfg.seed)
            feats, labels = extract_features(ctx.objective.eval_encoder(), ds, image_size=self.view_size or
                                             eval_image_size(cfg), batch_size=ev.batch_size, device=ctx.fabric.device,
                                             progress=False, desc="online probe")
            top1, top5 = topk_accuracy(self.probe.logits(feats), labels)
            result = {"probe_top1": top1, "probe_top5": top5}
        ctx.fabric.barrier()
        return result

    def report(self, ctx: TrainContext, what: str) -> None:
        r = self.score(ctx)
        if r is not None and ctx.logs is not None:
            ctx.logs.log(ctx.state.step, {**r, "epoch": ctx.state.epoch, "train_seconds": ctx.state.train_time})
            ctx.logs.flush()
            ctx.result["online_probe"] = r
            ctx.print(f"{what}: online linear probe top-1 {r['probe_top1']:.2f}% on {ctx.cfg.data.eval_split}")

    def on_epoch_end(self, ctx: TrainContext) -> None:
        s, every = ctx.state, ctx.cfg.eval.knn_every or 1
        if not s.finished and s.epoch % every == 0:
            self.report(ctx, f"epoch {s.epoch}")

    def on_train_end(self, ctx: TrainContext) -> None:
        if not ctx.state.stopped_early:
            self.report(ctx, f"step {ctx.state.step}")

    def checkpoint_state(self, ctx: TrainContext) -> dict[str, Any]:
        if self.probe is None:
            return {}
        return {"online_probe": {**self.probe.state_dict(), "view_size": self.view_size}}
