"""SIGINT, SIGTERM and SIGUSR1 end a run cleanly: the step in progress finishes, a checkpoint is written, and the run
says where it is and how to resume. Schedulers and container runtimes send SIGTERM before they kill a job.

SIGUSR1 is SLURM's warning signal (``#SBATCH --signal=USR1@90``: 90 s before the time limit or a preemption).
After the checkpoint, a run under SLURM (``$SLURM_JOB_ID`` set) with ``trainer.requeue: true`` puts its job back
in the queue with ``scontrol requeue`` (rank 0 only, once); the requeued job runs the same command, and
``sslkit pretrain RECIPE --resume auto`` continues from that checkpoint.

Exit codes: 128 + the signal number, as a shell reports a process ended by that signal: 130 (SIGINT),
143 (SIGTERM), 138 (SIGUSR1, checkpointed, and requeued when the message says so).

A second signal ends the process at once; the last checkpoint, written atomically, stays intact.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
from typing import TYPE_CHECKING

from sslkit.engine.callbacks import Callback

if TYPE_CHECKING:
    from sslkit.engine.context import TrainContext

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
REQUEUE_SIGNAL = signal.SIGUSR1  # SLURM's warning signal: checkpoint, then requeue the job
SCONTROL_TIMEOUT_S = 60  # SLURM's controller answers in well under a second; a hung call must not eat the grace time


def ignore_interrupts(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT and SIGUSR1, so a Ctrl-C sent to the whole process group,
    or SLURM's warning signal sent to every process of the job step, reaches the main process's handler without
    killing the workers under the step in progress. SIGTERM keeps its default: Python's exit stops daemonic workers
    with it, and a worker that ignored it would hang the exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def requeue_job(job_id: str) -> str:
    """``scontrol requeue JOB_ID``; returns a sentence saying what happened (the run is checkpointed either way, so a
    failure is reported, never raised)."""
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):
        return f"not requeueing: $SLURM_JOB_ID is {job_id[:40]!r}, not a SLURM job id. Resubmit the job script."
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return (f"could not requeue SLURM job {job_id}: `scontrol` is not on PATH. Resubmit the job script; it "
                "continues with `--resume auto`.")
    try:
        done = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True,
                              timeout=SCONTROL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not requeue SLURM job {job_id}: {type(e).__name__}: {e}. Resubmit the job script."
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        return (f"could not requeue SLURM job {job_id}: `scontrol requeue` exited {done.returncode}"
                f"{f' ({why[-1][:200]})' if why else ''}. Was the job submitted with `--requeue`? Resubmit the job "
                "script.")
    return f"requeued SLURM job {job_id} (`scontrol requeue`); it restarts with the same command"


class TrainingInterrupted(Exception):
    """A run stopped by a signal after checkpointing; ``exit_code`` is the conventional 128 + signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class SignalCheckpoint(Callback):
    """Turns SIGINT / SIGTERM / SIGUSR1 into "finish this step, checkpoint, stop" (all ranks stop at the same step);
    after SIGUSR1 under SLURM, rank 0 also requeues the job when ``requeue`` is true."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, requeue: bool = True) -> None:
        self.signals = signals
        self.requeue = requeue
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
        ctx.fabric.barrier()  # no rank leaves (and, under srun, gets the job step killed) before rank 0 has written it
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
        message = (f"{signal.Signals(signum).name} received: stopped after step {ctx.state.step} and saved {ckpt}. "
                   f"Resume with `sslkit pretrain --resume {ctx.run_dir}` (or `sslkit pretrain RECIPE --resume auto`).")
        job = os.environ.get("SLURM_JOB_ID")
        if signum == REQUEUE_SIGNAL and job and self.requeue and ctx.is_main:  # rank 0 only: one requeue per job
            message += " " + requeue_job(job) + "."
        if ctx.world > 1:
            ctx.fabric.barrier()  # the other ranks wait for the requeue, so none exits (and ends the step) first
        raise TrainingInterrupted(signum, message)
