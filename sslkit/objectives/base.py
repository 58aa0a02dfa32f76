"""The interface every objective implements; the engine calls only these methods."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sslkit.encoders import Encoder
from sslkit.heads.momentum import MomentumTeacher
from sslkit.losses.distributed import rank, world_size

SEED_MIX = 1_000_003  # spreads (seed, step, sample) apart before they seed a generator


def sample_seed(seed: int, step: int, index: int = 0) -> int:
    """A generator seed for sample ``index`` of the global batch at ``step`` (or for the whole step, index 0).

    Randomness drawn from it (MAE's and iBOT's masks) depends on the run's seed, the step and the sample's place
    in the global batch, not on how the batch is split over processes nor on the global RNG, so a 2-process
    run masks each image as one process would, and a resumed run masks as the original did.
    """
    return ((seed * SEED_MIX + step) * SEED_MIX + index) % 2**63


def global_rows(local_batch: int) -> tuple[int, int]:
    """(offset, total): where this rank's ``local_batch`` rows sit in the global batch, and its size (every
    rank holds the same number of samples)."""
    return rank() * local_batch, world_size() * local_batch


@dataclass
class ObjectiveConfig:
    name: str = "simclr"


@dataclass(frozen=True)
class Views:
    """The views an objective needs from the augmentation pipeline, in terms of what the pipeline makes.

    Args:
        num_global: leading views of one size (SimCLR, BYOL, VICReg: 2; MAE: 1; DINO: 2, the teacher's input).
        locals: whether any number of further views (multi-crop's smaller local crops) may follow them.

    The recipe check compares this with the pipeline's ``view_sizes`` before any work starts, so a new
    augmentation works with every objective whose views it makes, whatever it is called.
    """

    num_global: int = 2
    locals: bool = False

    def problem(self, sizes: Sequence[int]) -> str | None:
        """Why views of ``sizes`` do not fit, or None when they do."""
        sizes = list(sizes)
        if len(sizes) < self.num_global or len(set(sizes[:self.num_global])) != 1:
            return f"needs {self._count()} of one size first; the pipeline makes views of sizes {sizes}"
        if not self.locals and len(sizes) != self.num_global:
            return (f"takes exactly {self._count()} and no local crops; the pipeline makes {len(sizes)} "
                    f"(sizes {sizes})")
        return None

    def _count(self) -> str:
        words = {1: "one view", 2: "two views", 3: "three views"}
        return words.get(self.num_global, f"{self.num_global} views")

    def __str__(self) -> str:
        return f"{self._count()} of one size" + (" then any local crops" if self.locals else "")


class Objective(nn.Module):
    """Base class. Subclasses set ``Config`` and implement :meth:`forward`.

    A new objective subclasses this, registers itself with ``@OBJECTIVES.register(name, config=Config)`` at
    import time and is then trained by the one engine, in sslkit or in a plug-in module (``$SSLKIT_PLUGINS``).

    Attributes:
        Config: the dataclass of the recipe's ``objective`` section (every key checked with its type).
        views: the :class:`Views` the objective needs; :meth:`required_views` may refine it from the config.
        seed: the run's seed (set by :func:`sslkit.engine.build.build_objective` from the recipe; 0 otherwise).
            Randomness that must not depend on the split of the batch over processes is drawn from
            :func:`sample_seed` of it, the step and the sample's global index.
    """

    Config: type = ObjectiveConfig
    views: Views = Views(num_global=2)
    seed: int = 0

    @classmethod
    def required_views(cls, cfg) -> Views:  # noqa: ANN001 - the objective's Config instance
        """The views this objective needs under ``cfg`` (checked against the augmentation before any work)."""
        return cls.views

    def __init__(self, encoder: Encoder, cfg) -> None:
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg
        self.steps_per_epoch = 1
        self.total_steps = 1

    def setup_schedule(self, steps_per_epoch: int, total_steps: int) -> None:
        """Called once before training so per-step schedules can be computed up front."""
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.total_steps = max(1, int(total_steps))

    def forward(self, views: list[torch.Tensor], step: int = 0) -> dict[str, torch.Tensor]:
        """``views``: list of (B, 3, h, w) batches. Returns ``{"loss": scalar, ...other scalars to log}``."""
        raise NotImplementedError

    def on_after_backward(self, step: int) -> None:
        """Between backward and the optimiser step (e.g. cancel gradients of a frozen layer)."""

    def students(self) -> dict[str, nn.Module]:
        """The modules a momentum teacher (``self.teacher``, a :class:`~sslkit.heads.MomentumTeacher`) averages,
        under the teacher's names for them; empty for objectives without one."""
        return {}

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        """After the optimiser step: a momentum teacher takes its EMA step towards :meth:`students` with this
        step's momentum. Override (and call super) for other per-step updates."""
        teacher = getattr(self, "teacher", None)
        if isinstance(teacher, MomentumTeacher):
            teacher.update_from(self.students(), step, self.total_steps)

    def eval_encoder(self) -> Encoder:
        """The encoder evaluation should use (DINO: the teacher's)."""
        return self.encoder

    def no_weight_decay(self) -> set[str]:
        """Full parameter names excluded from weight decay besides biases and 1-d parameters."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
