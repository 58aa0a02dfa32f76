"""The one training engine, shared by every objective, on Lightning Fabric.

- :mod:`~sslkit.engine.loop`: :func:`train` and the loop itself (:func:`~sslkit.engine.loop.train_one_epoch`);
- :mod:`~sslkit.engine.state`: the run's position and measurements in one object;
- :mod:`~sslkit.engine.context`: everything one process works with, handed to the loop and the callbacks;
- :mod:`~sslkit.engine.callbacks`: progress, logs, checkpoints, the non-finite guard;
- :mod:`~sslkit.engine.budget`: the time budget, which owns the refit of the schedules;
- :mod:`~sslkit.engine.monitor`: the k-NN monitor, the only place where training touches :mod:`sslkit.eval`;
- :mod:`~sslkit.engine.checkpoint`, :mod:`~sslkit.engine.precision`, :mod:`~sslkit.engine.schedules`,
  :mod:`~sslkit.engine.logs`, :mod:`~sslkit.engine.build`, :mod:`~sslkit.engine.rundir`.
"""

from sslkit.engine.budget import TimeBudget, fit_steps_to_budget
from sslkit.engine.build import build_objective, build_optimizer, build_pipeline
from sslkit.engine.callbacks import Callback, NonFiniteLossError
from sslkit.engine.checkpoint import load_checkpoint
from sslkit.engine.loop import TrainResult, train, train_one_epoch
from sslkit.engine.precision import cpu_bf16_speedup, cpu_has_native_bf16, resolve_precision
from sslkit.engine.schedules import cosine_schedule, scaled_lr
from sslkit.engine.state import WARMUP_STEPS_EXCLUDED, TrainState

__all__ = ["WARMUP_STEPS_EXCLUDED", "Callback", "NonFiniteLossError", "TimeBudget", "TrainResult", "TrainState",
           "build_objective", "build_optimizer", "build_pipeline", "cosine_schedule", "cpu_bf16_speedup",
           "cpu_has_native_bf16", "fit_steps_to_budget", "load_checkpoint", "resolve_precision", "scaled_lr",
           "train", "train_one_epoch"]
