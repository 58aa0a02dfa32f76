"""The time budget: a run fitted to so many minutes of pretraining.

With ``trainer.time_budget_minutes`` set, ``trainer.epochs`` (or ``max_steps``) is an upper bound. After
``trainer.budget_calibration_steps`` steady steps the budget measures seconds per step and sets the total number of
steps, and with it every cosine schedule, to what fits; at each epoch end it fits again from the rate so far. The
fitted total is kept in the checkpoint, so a resumed run continues the same schedule.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from sslkit.engine.callbacks import Callback

if TYPE_CHECKING:
    from sslkit.engine.context import TrainContext


def fit_steps_to_budget(step: int, elapsed_s: float, seconds_per_step: float, budget_s: float, cap: int) -> int:
    """Total steps that end a run near ``budget_s`` seconds of training: ``step`` done in ``elapsed_s``, the rest
    at ``seconds_per_step``. At least ``step + 1`` (the step in progress finishes), at most ``cap``."""
    if seconds_per_step <= 0:
        return cap
    more = math.floor(max(0.0, budget_s - elapsed_s) / seconds_per_step)
    return int(min(cap, max(step + 1, step + more)))


class TimeBudget(Callback):
    """Owns the refit: measures the steady rate, sets ``state.total_steps`` and refits the schedules.

    Args:
        minutes: the budget.
        calibration_steps: steady steps measured before the first fit.
        fitted_total: the total a resumed run had fitted (None for a fresh run).
    """

    def __init__(self, minutes: float, calibration_steps: int, fitted_total: int | None = None) -> None:
        self.seconds = minutes * 60.0
        self.minutes = minutes
        self.calibration_steps = calibration_steps
        self.fitted = fitted_total is not None

    def on_step_end(self, ctx: TrainContext, out: dict) -> None:
        if not self.fitted and ctx.state.steady_steps >= self.calibration_steps:
            self.refit(ctx, f"{self.calibration_steps} steps measured")

    def on_epoch_end(self, ctx: TrainContext) -> None:
        s = ctx.state
        # Needs this process's own steady steps: a run resumed at an epoch end has measured none yet.
        if self.fitted and not s.finished and s.steady_steps > 0:
            self.refit(ctx, f"epoch {s.epoch} done")

    def refit(self, ctx: TrainContext, reason: str) -> None:
        """Fit the total steps (and the schedules) to the budget from the steady rate measured so far."""
        s = ctx.state
        rate = s.steady_time / max(1, s.steady_steps)  # seconds per step, steady state
        new = fit_steps_to_budget(s.step, s.prior_seconds + s.train_time, rate, self.seconds, s.cap_steps)
        if ctx.world > 1:
            new = int(ctx.fabric.broadcast(new, src=0))  # every rank follows rank 0's clock
        first = not self.fitted
        self.fitted = True
        if new == s.total_steps:
            return
        ctx.set_total_steps(new)
        if first or ctx.cfg.trainer.progress:
            ctx.print(f"time budget {self.minutes:g} min ({reason}): {rate:.3f} s/step -> {new} steps "
                      f"({new / s.steps_per_epoch:.2f} epochs, at most {s.cap_steps})")

    def checkpoint_state(self, ctx: TrainContext) -> dict:
        return {"budget_total_steps": ctx.state.total_steps if self.fitted else None}
