"""Callbacks: everything that hangs off the training loop without being part of the step.

The loop (:mod:`sslkit.engine.loop`) calls each hook of every callback in order. The standard set, in that order:
:class:`~sslkit.engine.budget.TimeBudget`, :class:`Progress`, :class:`MetricsLogger`, :class:`Checkpointer`,
:class:`NonFiniteGuard` and the k-NN monitor (:class:`sslkit.engine.monitor.KNNMonitor`). A callback may add
entries to the checkpoint (:meth:`Callback.checkpoint_state`); the loop hands them back on resume.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sslkit.engine.context import TrainContext


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN/Inf."""


class Callback:
    """Base class; override the hooks you need. ``out`` is the objective's output dict for the step."""

    def on_train_start(self, ctx: TrainContext) -> None: ...

    def on_step_end(self, ctx: TrainContext, out: dict[str, torch.Tensor]) -> None: ...

    def on_bad_step(self, ctx: TrainContext, what: str, value: float) -> None:
        """A step whose loss or gradient norm was not finite on some rank; its update was skipped."""

    def on_epoch_end(self, ctx: TrainContext) -> None: ...

    def on_train_end(self, ctx: TrainContext) -> None: ...

    def checkpoint_state(self, ctx: TrainContext) -> dict[str, Any]:
        """Entries this callback adds to the training checkpoint."""
        return {}


class Callbacks(Callback):
    """Calls every hook on each callback in turn."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)

    def on_train_start(self, ctx: TrainContext) -> None:
        for c in self.callbacks:
            c.on_train_start(ctx)

    def on_step_end(self, ctx: TrainContext, out: dict[str, torch.Tensor]) -> None:
        for c in self.callbacks:
            c.on_step_end(ctx, out)

    def on_bad_step(self, ctx: TrainContext, what: str, value: float) -> None:
        for c in self.callbacks:
            c.on_bad_step(ctx, what, value)

    def on_epoch_end(self, ctx: TrainContext) -> None:
        for c in self.callbacks:
            c.on_epoch_end(ctx)

    def on_train_end(self, ctx: TrainContext) -> None:
        for c in self.callbacks:
            c.on_train_end(ctx)

    def checkpoint_state(self, ctx: TrainContext) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for c in self.callbacks:
            state.update(c.checkpoint_state(ctx))
        return state


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress(Callback):
    """Progress on rank 0: a bar (images, rate, ETA) when stderr is a terminal; otherwise (SLURM logs, nohup, a
    redirected stderr) a line every ``every_seconds`` with the step, loss, images/s and ETA. The same lines go to
    ``train.log`` in the run directory at that interval whatever the terminal, so a finished or killed run keeps
    its history. ``trainer.progress=false`` silences the terminal, not the log file.
    """

    def __init__(self, every_seconds: float, terminal: bool = True, stream: Any = None) -> None:
        self.every = every_seconds
        self.terminal = terminal
        self.stream = stream or sys.stderr
        self.bar = None
        self._last_line = -math.inf

    def on_train_start(self, ctx: TrainContext) -> None:
        if not ctx.is_main:
            return
        self._last_line = time.monotonic()
        isatty = getattr(self.stream, "isatty", lambda: False)()
        if self.terminal and isatty:
            from tqdm.auto import tqdm

            s = ctx.state
            self.bar = tqdm(total=s.total_steps * s.global_batch, initial=s.step * s.global_batch, unit="img",
                            unit_scale=True, dynamic_ncols=True, desc="pretrain", file=self.stream)

    def line(self, ctx: TrainContext) -> str:
        s = ctx.state
        rate = s.steady_images_per_s
        eta = (s.total_steps - s.step) * s.global_batch / rate if rate > 0 else float("nan")
        return (f"step {s.step}/{s.total_steps}  epoch {s.epoch}  loss {s.last_loss:.4f}  {rate:.1f} images/s  "
                f"ETA {_eta(eta)}")

    def on_step_end(self, ctx: TrainContext, out: dict[str, torch.Tensor]) -> None:
        if not ctx.is_main:
            return
        s = ctx.state
        if self.bar is not None:
            self.bar.total = s.total_steps * s.global_batch  # the time budget may have refitted it
            self.bar.update(s.global_batch)
            self.bar.set_postfix(loss=f"{s.last_loss:.4f}", epoch=s.epoch, refresh=False)
        now = time.monotonic()
        if now - self._last_line >= self.every or s.finished:
            self._last_line = now
            text = self.line(ctx)
            ctx.log_file(text)
            if self.bar is None and self.terminal:
                print(text, file=self.stream, flush=True)

    def on_train_end(self, ctx: TrainContext) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsLogger(Callback):
    """A row of ``metrics.csv`` and TensorBoard every ``trainer.log_every_steps`` steps: lr, weight decay,
    images/s and every scalar the objective returned."""

    def on_step_end(self, ctx: TrainContext, out: dict[str, torch.Tensor]) -> None:
        s = ctx.state
        if ctx.logs is None or not (s.step % ctx.cfg.trainer.log_every_steps == 0 or s.finished):
            return
        row = {"epoch": s.epoch, "lr": float(ctx.schedules.lr[s.step - 1]),
               "wd": float(ctx.schedules.weight_decay[s.step - 1]), "images_per_s": s.images_per_s}
        row.update({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()})
        ctx.logs.log(s.step, row)


class Checkpointer(Callback):
    """``checkpoints/last.ckpt`` every ``trainer.checkpoint_every_steps`` steps, at every epoch end, at the last step
    and at ``stop_at_step``; ``encoder.safetensors`` (the objective's eval encoder) when training finishes."""

    def __init__(self, every_steps: int) -> None:
        self.every = every_steps

    def on_step_end(self, ctx: TrainContext, out: dict[str, torch.Tensor]) -> None:
        s = ctx.state
        periodic = self.every and s.step % self.every == 0 and not s.epoch_done
        if s.step == s.stop_at_step or s.finished or periodic:
            if s.epoch_done:
                ctx.save_checkpoint(batch_in_epoch=0, epoch=s.epoch + 1)
            else:
                ctx.save_checkpoint(batch_in_epoch=s.batch_in_epoch, epoch=s.epoch)

    def on_epoch_end(self, ctx: TrainContext) -> None:
        s = ctx.state  # the loop has moved to the next epoch
        if not s.finished and s.batch_in_epoch == 0 and not s.stopped_early:
            ctx.save_checkpoint(batch_in_epoch=0, epoch=s.epoch)

    def on_train_end(self, ctx: TrainContext) -> None:
        if ctx.state.stopped_early:
            return
        ctx.unshard_for_eval()  # FSDP: every rank gathers; rank 0 then holds the whole objective
        if ctx.is_main:
            from sslkit.run import save_encoder

            save_encoder(ctx.objective.eval_encoder(), ctx.run_dir / "encoder.safetensors")


class NonFiniteGuard(Callback):
    """Skips up to ``trainer.skip_nonfinite_steps`` non-finite steps with a warning, then stops the run with a
    message that names the likely causes and where the last good checkpoint is."""

    def __init__(self, tolerated: int) -> None:
        self.tolerated = tolerated
        self.bad_steps = 0

    def on_bad_step(self, ctx: TrainContext, what: str, value: float) -> None:
        self.bad_steps += 1
        step = ctx.state.step
        if self.bad_steps > self.tolerated:
            raise NonFiniteLossError(self.message(ctx, what, value))
        warning = (f"warning: {what} is {value} at step {step}; skipped the update ({self.bad_steps}/{self.tolerated} "
                   "tolerated by trainer.skip_nonfinite_steps)")
        print(warning, file=sys.stderr)
        ctx.log_file(warning)

    def message(self, ctx: TrainContext, what: str, value: float) -> str:
        from sslkit.engine.precision import resolve_precision

        step, lr = ctx.state.step, float(ctx.schedules.lr[ctx.state.step])
        ckpt = ctx.run_dir / "checkpoints" / "last.ckpt"
        where = f"the last good checkpoint is {ckpt}" if ckpt.is_file() else "no checkpoint was written yet"
        return (f"{what} is {value} at step {step} ({self.bad_steps} non-finite step(s), {self.tolerated} tolerated; "
                f"lr {lr:.3g}, precision {resolve_precision(ctx.cfg)}). Likely causes: a learning rate too high for "
                "this batch (lower optim.lr or lengthen optim.warmup_epochs), or fp16 overflow (use bf16-mixed or "
                f"32-true); {where}.")
