"""The run's state in one object: where the run is, and what it has measured."""

from __future__ import annotations

from dataclasses import dataclass

WARMUP_STEPS_EXCLUDED = 2  # steady-state throughput skips a process's first steps (worker start-up, allocator warm-up)


@dataclass
class TrainState:
    """Position and measurements of a run. ``step`` counts optimiser steps over the whole run (resumes included);
    the time and image counters are this process's own, ``prior_seconds`` the training time before a resume."""

    steps_per_epoch: int
    cap_steps: int  # trainer.epochs (or max_steps) in steps: the most a time budget may fit
    total_steps: int
    global_batch: int
    world: int = 1
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    start_step: int = 0  # the step this process started at
    stop_at_step: int | None = None
    stopped_early: bool = False
    stop_requested: bool = False  # a signal asked the run to stop after the current step (engine.signals)
    prior_seconds: float = 0.0
    train_time: float = 0.0
    images: int = 0
    steady_images: int = 0
    steady_time: float = 0.0
    data_wait: float = 0.0
    first_step_seconds: float = 0.0
    last_loss: float = float("nan")

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    @property
    def epoch_done(self) -> bool:
        return self.batch_in_epoch >= self.steps_per_epoch

    @property
    def steady_steps(self) -> int:
        """Steps this process timed in the steady state."""
        return max(0, self.step - self.start_step - WARMUP_STEPS_EXCLUDED)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.train_time, 1e-9)

    @property
    def steady_images_per_s(self) -> float:
        return self.steady_images / self.steady_time if self.steady_time > 0 else self.images_per_s

    def record_step(self, t_start: float, t_data: float, t_end: float, loss: float) -> None:
        """Count a finished optimiser step: ``t_start`` when it began waiting for data, ``t_data`` when the batch
        arrived, ``t_end`` when the update was done."""
        self.step += 1
        self.batch_in_epoch += 1
        self.train_time += t_end - t_start
        self.images += self.global_batch
        self.last_loss = loss
        if self.step == self.start_step + 1:
            self.first_step_seconds = t_end - t_start  # with trainer.compile this is mostly compilation
        if self.step > self.start_step + WARMUP_STEPS_EXCLUDED:
            self.steady_time += t_end - t_start
            self.steady_images += self.global_batch
            self.data_wait += t_data - t_start
