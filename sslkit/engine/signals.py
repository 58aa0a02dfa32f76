"""SIGINT and SIGTERM end a run cleanly: the step in progress finishes, a checkpoint is written, and the run says
where it is and how to resume. Schedulers and container runtimes send SIGTERM before they kill a job.

A second signal ends the process at once; the last checkpoint, written atomically, stays intact.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING

from sslkit.engine.callbacks import Callback

if TYPE_CHECKING:
    from sslkit.engine.context import TrainContext

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_interrupts(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT, so a Ctrl-C sent to the whole process group reaches the
    main process's handler without killing the workers under the step in progress. SIGTERM keeps its default:
    Python's exit stops daemonic workers with it, and a worker that ignored it would hang the exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainingInterrupted(Exception):
    """A run stopped by a signal after checkpointing; ``exit_code`` is the conventional 128 + signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class SignalCheckpoint(Callback):
    """Turns SIGINT / SIGTERM into "finish this step, checkpoint, stop" (all ranks stop at the same step)."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:  # the second signal: leave now, as the default action would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    def on_train_start(self, ctx: TrainContext) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)

    def on_step_end(self, ctx: TrainContext, out: dict) -> None:
        s = ctx.state
        if not ctx.any_rank(self.received is not None) or s.finished:
            return
        if s.epoch_done:
            ctx.save_checkpoint(batch_in_epoch=0, epoch=s.epoch + 1)
        else:
            ctx.save_checkpoint(batch_in_epoch=s.batch_in_epoch, epoch=s.epoch)
        s.stop_requested = True

    def on_train_end(self, ctx: TrainContext) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def raise_if_stopped(self, ctx: TrainContext) -> None:
        """After the run has closed its logs: raise :class:`TrainingInterrupted` naming the checkpoint."""
        if not ctx.state.stop_requested:
            return
        signum = self.received if self.received is not None else signal.SIGTERM
        ckpt = ctx.run_dir / "checkpoints" / "last.ckpt"
        raise TrainingInterrupted(signum, f"{signal.Signals(signum).name} received: stopped after step "
                                          f"{ctx.state.step} and saved {ckpt}. Resume with `sslkit pretrain "
                                          f"--resume {ctx.run_dir}`.")
