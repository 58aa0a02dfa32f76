"""Training health: the representation's effective rank, DINO's teacher entropy and center, and a collapse alarm.

Every ``trainer.health.every_steps`` steps (0 = off) the :class:`Health` callback measures, on the step's batch:

* ``rankme``: the effective rank of the student encoder's features (Garrido et al. 2023, "RankMe: Assessing the
  Downstream Performance of Pretrained Self-Supervised Representations by Their Rank", arXiv:2210.02885):
  ``exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / sum(sigma) + 1e-7`` over the singular values ``sigma`` of the
  ``(B, D)`` feature matrix of the batch's first view. The encoder runs once more for this, in eval mode and without
  gradients, so training itself is unchanged (no BatchNorm statistics, no random numbers). It lies between 1 (every
  image has the same feature direction) and ``min(B, D)``; ``rankme_share = (rankme - 1) / (min(B, D) - 1)`` places
  it on that range, 0 for complete collapse and 1 for features that use every direction equally, whatever the
  batch size.
* for objectives that report ``teacher_entropy`` (DINO): that entropy (nats, the mean per-image entropy of the
  centred, sharpened teacher softmax, computed by the objective itself) as a share of ``log K``
  (``teacher_entropy_share``), and the L2 norm of DINO's center (``center_norm``).

The values go into ``metrics.csv`` and TensorBoard in the row of the loss, and as one line into ``train.log``.

**The collapse alarm** fires when one of these holds for ``trainer.health.patience`` consecutive checks:

* ``rankme_share < trainer.health.min_rank_share`` (default 0.01: an effective rank within 1% of the way from 1 to
  ``min(B, D)``): complete or dimensional collapse, every image mapped to (nearly) the same direction;
* ``teacher_entropy_share < trainer.health.min_entropy_share`` (default 0.02): one-hot collapse, the teacher puts
  (nearly) all of its mass on one prototype, sharpening dominates centering;
* ``teacher_entropy_share > trainer.health.max_entropy_share`` (default 0.995): uniform collapse, the teacher's
  output is (nearly) flat over the ``K`` prototypes, centering dominates sharpening.

It then prints one warning (terminal and ``train.log``, once per run) naming the likely causes and fixes; with
``trainer.health.on_collapse: stop`` it also writes a checkpoint and ends the run with :class:`TrainingCollapsed`.
The CPU recipes sit far from these lines: on Fashion-MNIST their first steps read ``rankme_share`` 0.25-0.33
(SimCLR, steps 1-12) and 0.31-0.41 (DINO, steps 1-60), and DINO's teacher entropy share 0.68-0.80, while a DINO
teacher at temperature 20 reads 1.00 (``tests/test_health.py`` runs both sides).
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any

import torch

from sslkit.engine.callbacks import Callback
from sslkit.run import RunError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from sslkit.engine.context import TrainContext

RANKME_EPS = 1e-7  # Garrido et al. 2023, Eq. 1
ON_COLLAPSE = ("warn", "stop")


class TrainingCollapsed(RunError):
    """The collapse alarm ended the run (``trainer.health.on_collapse: stop``); the message says why and what to do."""


def rankme(features: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """Effective rank of a ``(N, D)`` feature matrix: ``exp`` of the entropy of its normalised singular values.

    Example:
        >>> rankme(torch.eye(8))  # 8 equal singular values
        8.0...
    """
    s = torch.linalg.svdvals(features.detach().double())  # (min(N, D),)
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def step_features(ctx: TrainContext, encoder: torch.nn.Module) -> torch.Tensor | None:
    """``(B, D)`` float32 features of the step's first view from ``encoder`` after the step's update, in eval mode,
    under the run's autocast and without gradients (training is unchanged by them); None when the loop gave no
    inputs this step. Cached per step and encoder: the health check and the online probe share one forward pass
    when they look at the same encoder (not DINO's, whose probe reads the teacher)."""
    from sslkit.eval.features import _inference_mode

    inputs = ctx.step_inputs
    if inputs is None:
        return None
    key = (ctx.state.step, id(encoder))
    cache = ctx.result.setdefault("_step_features", {})
    if key not in cache:
        for old in [k for k in cache if k[0] != key[0]]:  # only this step's features are kept
            del cache[old]
        with _inference_mode(encoder), ctx.fabric.autocast():
            cache[key] = encoder(inputs[0][0]).float()  # (B, D)
    return cache[key]


class Health(Callback):
    """The measurements and the collapse alarm of the module notes, every ``every_steps`` steps.

    Placed before :class:`~sslkit.engine.callbacks.MetricsLogger`, it adds its scalars to the step's output so they
    share the loss's row in ``metrics.csv``; on a step that row is not written it writes a row of its own.
    """

    def __init__(self, every_steps: int, patience: int = 3, on_collapse: str = "warn", min_rank_share: float = 0.01,
                 min_entropy_share: float = 0.02, max_entropy_share: float = 0.995,
                 state: dict[str, Any] | None = None) -> None:
        if on_collapse not in ON_COLLAPSE:
            raise ValueError(f"on_collapse must be one of {ON_COLLAPSE}, got {on_collapse!r}")
        self.every = every_steps
        self.patience = patience
        self.on_collapse = on_collapse
        self.min_rank_share = min_rank_share
        self.min_entropy_share = min_entropy_share
        self.max_entropy_share = max_entropy_share
        state = state or {}
        self.streak = int(state.get("streak", 0))  # consecutive checks with a problem
        self.warned = bool(state.get("warned", False))

    @classmethod
    def from_config(cls, cfg: DictConfig, ckpt: dict | None = None) -> Health | None:
        """The recipe's ``trainer.health`` section; None when ``every_steps`` is 0. Resumes the alarm's count."""
        h = cfg.trainer.health
        if not h.every_steps:
            return None
        return cls(int(h.every_steps), int(h.patience), str(h.on_collapse), float(h.min_rank_share),
                   float(h.min_entropy_share), float(h.max_entropy_share), (ckpt or {}).get("health"))

    def measure(self, ctx: TrainContext, out: dict[str, torch.Tensor]) -> dict[str, float]:
        """This step's health scalars (see the module notes)."""
        values: dict[str, float] = {}
        feats = step_features(ctx, ctx.objective.encoder)
        if feats is not None:
            values["rankme"] = rankme(feats)
            values["rankme_share"] = (values["rankme"] - 1) / max(1, min(feats.shape) - 1)
        k = getattr(getattr(ctx.objective, "cfg", None), "out_dim", None)
        if "teacher_entropy" in out and k:
            values["teacher_entropy_share"] = float(out["teacher_entropy"].detach()) / math.log(k)
        center = getattr(ctx.objective, "center", None)
        if torch.is_tensor(center):
            values["center_norm"] = float(center.detach().float().norm())
        return values

    def problems(self, values: dict[str, float]) -> list[str]:
        """What in ``values`` crosses the alarm's lines, in words."""
        found = []
        if values.get("rankme_share", 1.0) < self.min_rank_share:
            found.append(f"the features' effective rank (RankMe) is {values['rankme']:.2f}, "
                         f"{100 * values['rankme_share']:.2f}% of the way from 1 to its maximum (alarm below "
                         f"{100 * self.min_rank_share:g}%): the images map to (nearly) one direction")
        share = values.get("teacher_entropy_share")
        if share is not None and share < self.min_entropy_share:
            found.append(f"the teacher's output entropy is {100 * share:.2f}% of log K (alarm below "
                         f"{100 * self.min_entropy_share:g}%): one-hot collapse, sharpening dominates centering")
        if share is not None and share > self.max_entropy_share:
            found.append(f"the teacher's output entropy is {100 * share:.2f}% of log K (alarm above "
                         f"{100 * self.max_entropy_share:g}%): uniform collapse, centering dominates sharpening")
        return found

    def on_step_end(self, ctx: TrainContext, out: dict[str, torch.Tensor]) -> None:
        s = ctx.state
        if s.step % self.every:
            return
        values = self.measure(ctx, out)
        found = self.problems(values)
        self.streak = self.streak + 1 if found else 0
        logged_with_loss = s.step % ctx.cfg.trainer.log_every_steps == 0 or s.finished
        if logged_with_loss:
            out.update({k: torch.tensor(v) for k, v in values.items()})  # MetricsLogger writes the loss's row
        elif ctx.logs is not None:
            ctx.logs.log(s.step, {"epoch": s.epoch, "loss": s.last_loss, **values})
        ctx.log_file(f"health at step {s.step}: " + "  ".join(f"{k} {v:.4g}" for k, v in values.items()))
        alarm = ctx.any_rank(self.streak >= self.patience)
        if alarm and not self.warned:
            self.warned = True
            message = self.message(ctx, found)
            if self.on_collapse == "stop":
                if ctx.logs is not None and logged_with_loss:
                    ctx.logs.log(s.step, {"epoch": s.epoch, "loss": s.last_loss, **values})  # MetricsLogger won't run
                ctx.save_checkpoint(batch_in_epoch=0 if s.epoch_done else s.batch_in_epoch,
                                    epoch=s.epoch + 1 if s.epoch_done else s.epoch)
                ckpt = ctx.run_dir / "checkpoints" / "last.ckpt"
                ctx.log_file(f"error: {message} Stopped after step {s.step} (saved {ckpt}).")
                s.stopped_early = True  # the other callbacks wind down as after a stop: no encoder export, no k-NN
                ctx.callbacks.on_train_end(ctx)  # closes the progress bar, gives the signal handlers back
                if ctx.logs is not None:
                    ctx.logs.close()
                raise TrainingCollapsed(f"{message} Stopped by trainer.health.on_collapse=stop after step {s.step}; "
                                        f"saved {ckpt}. The fixes change the recipe, so start a new run.")
            warning = f"warning: {message} (trainer.health.on_collapse=stop ends such a run)"
            if ctx.is_main:
                print(warning, file=sys.stderr, flush=True)
            ctx.log_file(warning)

    def message(self, ctx: TrainContext, found: list[str]) -> str:
        from sslkit.engine.precision import resolve_precision

        s, cfg = ctx.state, ctx.cfg
        what = "; ".join(found) or "another process saw a collapse"
        lr = float(ctx.schedules.lr[max(0, s.step - 1)])
        return (f"training looks collapsed at step {s.step} ({what}; {self.streak} consecutive checks every "
                f"{self.every} steps). Likely causes and fixes: for DINO, a teacher temperature too high "
                "(objective.teacher_temp and warmup_teacher_temp at 0.04; above 0.07 is unstable) or too low, or a "
                "teacher momentum that lets the teacher follow the student too fast (raise objective.momentum_teacher"
                f"); a learning rate too high (lr {lr:.3g}: lower optim.lr or lengthen optim.warmup_epochs); a batch "
                f"too small for the objective (global batch {s.global_batch}: raise data.batch_size); fp16 precision "
                f"(precision {resolve_precision(cfg)}: use bf16-mixed or 32-true).")

    def checkpoint_state(self, ctx: TrainContext) -> dict[str, Any]:
        return {"health": {"streak": self.streak, "warned": self.warned}}
