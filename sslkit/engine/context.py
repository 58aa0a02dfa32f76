"""Everything one training process works with, in one object, handed to the loop and to every callback."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sslkit.engine.callbacks import Callbacks
from sslkit.engine.checkpoint import rng_state, write_checkpoint
from sslkit.engine.logs import MetricsLog
from sslkit.engine.schedules import Schedules
from sslkit.engine.state import TrainState


@dataclass
class TrainContext:
    """The run as one process sees it: recipe, devices, objective, optimiser, data, schedules, state, callbacks."""

    fabric: Any  # lightning_fabric.Fabric
    cfg: DictConfig
    run_dir: Path
    objective: torch.nn.Module  # the bare objective (state_dict, eval_encoder, hooks)
    model: torch.nn.Module  # the same, wrapped by Fabric (and torch.compile) for the forward pass
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    loader: Any
    sampler: Any
    batched: Any  # a BatchedPipeline making views on the device, or None (views come from the loader workers)
    channels_last: bool
    schedules: Schedules
    state: TrainState
    callbacks: Callbacks = field(default_factory=lambda: Callbacks([]))
    logs: MetricsLog | None = None
    attention: str | None = None  # "fused" / "math" for ViTs, None for CNNs
    result: dict[str, Any] = field(default_factory=dict)  # what the callbacks measured (final k-NN, ...)
    step_inputs: tuple | None = None  # (views, labels) of the current step, for the health checks and the probe

    @property
    def is_main(self) -> bool:
        return bool(self.fabric.is_global_zero)

    @property
    def world(self) -> int:
        return int(self.fabric.world_size)

    def print(self, message: str) -> None:
        """A message on rank 0's stdout and in the run's ``train.log``."""
        self.fabric.print(message)
        self.log_file(message)

    def log_file(self, line: str) -> None:
        if self.is_main:
            from sslkit.run import open_no_follow

            with open_no_follow(self.run_dir / "train.log") as f:
                f.write(line.rstrip("\n") + "\n")

    def set_total_steps(self, total: int) -> None:
        """A new length for the run: the schedules and the objective's own schedules follow."""
        self.state.total_steps = int(total)
        self.schedules.fit(total)
        self.objective.setup_schedule(self.state.steps_per_epoch, total)

    def save_checkpoint(self, *, batch_in_epoch: int, epoch: int) -> None:
        """``checkpoints/last.ckpt`` for resuming at (``epoch``, ``batch_in_epoch``); every rank's RNG is gathered.

        Sharded (``trainer.strategy: fsdp``): every rank first writes its shards of the objective and optimiser to
        ``checkpoints/dcp-step<N>`` (:func:`sslkit.engine.fsdp.save_sharded`, atomic); then rank 0 writes
        ``last.ckpt`` with the training state and that folder's name, and deletes the older folders."""
        from sslkit.engine.fsdp import prune_sharded, save_sharded

        rng = rng_state()
        rngs = [rng] if self.world == 1 else _gather_objects(self.fabric, rng)
        s, ckpt_dir = self.state, self.run_dir / "checkpoints"
        if self.sharded:
            folder = save_sharded(ckpt_dir, s.step, self.objective, self.bare_optimizer, {"world_size": self.world},
                                  prune=False)
            weights = {"sharded": folder.name}
        elif self.is_main:
            weights = {"objective": self.objective.state_dict(), "optimizer": self.optimizer.state_dict()}
        if not self.is_main:
            return
        state = {"step": s.step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "world_size": self.world,
                 **weights, "rng": rngs, "config_yaml": OmegaConf.to_yaml(self.cfg),
                 "train_seconds": s.prior_seconds + s.train_time, **self.callbacks.checkpoint_state(self)}
        write_checkpoint(ckpt_dir / "last.ckpt", state)
        prune_sharded(ckpt_dir, keep=weights.get("sharded", ""))  # also those of an earlier, sharded, resume
        if self.logs is not None:
            self.logs.flush()

    @property
    def sharded(self) -> bool:
        """True under ``trainer.strategy: fsdp``: parameters are sharded across the processes."""
        return self.cfg.trainer.strategy == "fsdp"

    @property
    def bare_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # Fabric's wrapper holds the torch optimiser

    def unshard_for_eval(self) -> None:
        """After a sharded run's last step, before the end-of-run export and k-NN: gather the objective's whole
        state (collective: every rank calls this) into a plain copy of the objective on rank 0, which becomes
        ``self.objective`` there; the other ranks keep their shards. Nothing to do for an unsharded run."""
        if not self.sharded:
            return
        from sslkit.encoders import set_fused_attention
        from sslkit.engine.build import build_objective
        from sslkit.engine.fsdp import full_state
        from sslkit.run import load_state_strict

        state = full_state(self.objective)
        if self.is_main:
            plain = build_objective(self.cfg)
            load_state_strict(plain, state, "the gathered objective state")
            if self.attention is not None:
                set_fused_attention(plain, self.attention == "fused")
            self.objective = plain.to(self.fabric.device)
        self.fabric.barrier()

    def views(self, batch: Any) -> list[torch.Tensor]:
        """The step's views on the device: made there from a uint8 batch (batched backend), or moved there."""
        s = self.state
        if self.batched is not None:
            from sslkit.data.loader import batch_generator

            g = batch_generator(self.cfg.seed, s.epoch, s.batch_in_epoch, self.fabric.global_rank)
            views = self.batched(batch.to(self.fabric.device, non_blocking=True), generator=g)
        else:
            views = [v.to(self.fabric.device, non_blocking=True) for v in batch]
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (so all ranks take the same branch)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.fabric.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def summary(self) -> dict[str, Any]:
        from sslkit.engine.logs import peak_rss_gb
        from sslkit.engine.precision import resolve_precision

        s, ev = self.state, self.cfg.eval
        return {"steps": s.step, "total_steps": s.total_steps, "images_per_s": s.images_per_s,
                "steady_images_per_s": s.steady_images_per_s,
                "data_wait_share": s.data_wait / s.steady_time if s.steady_time > 0 else None,
                "train_seconds": s.train_time, "final_loss": s.last_loss, "peak_rss_gb": peak_rss_gb(),
                "world_size": self.world, "precision": resolve_precision(self.cfg), "knn": self.result.get("knn"),
                "finished": not s.stopped_early, "first_step_seconds": s.first_step_seconds,
                "compiled": bool(self.cfg.trainer.compile), "attention": self.attention,
                "epochs": s.step / s.steps_per_epoch, "time_budget_minutes": self.cfg.trainer.time_budget_minutes,
                "knn_protocol": {"center": bool(ev.knn_center), "k": ev.knn_k, "temperature": ev.knn_temperature,
                                 "whitened_also": ev.get("knn_whiten")}}


def _gather_objects(fabric, obj: Any) -> list[Any]:  # noqa: ANN001
    import torch.distributed as dist

    out: list[Any] = [None] * fabric.world_size
    dist.all_gather_object(out, obj)
    return out
