"""The momentum teacher: exponential moving averages of student modules (DINO, BYOL, MoCo v3).

The teacher starts as a copy of the student and is updated only by ``teacher <- m teacher + (1 - m) student``
after each optimiser step, with ``m`` rising from ``start`` to ``end`` on a cosine over all training steps
(BYOL, Grill et al. 2020, section 3.2; DINO's ``cosine_scheduler``). It never receives gradients. As a
module of the objective its weights are in the objective's ``state_dict``, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, start: float, end: float = 1.0) -> float:
    """Momentum at ``step``: ``end - (end - start) * (1 + cos(pi * step / total_steps)) / 2``.

    ``start`` at step 0, ``end`` at ``total_steps``; steps outside ``[0, total_steps]`` are clamped.
    """
    progress = min(max(step, 0), total_steps) / max(1, total_steps)
    return end - (end - start) * (1.0 + math.cos(math.pi * progress)) / 2.0


def strip_stochastic_depth(module: nn.Module) -> None:
    """Turn off stochastic depth and dropout in place: DropPath -> Identity, Dropout p -> 0 (no state changes).

    The official DINO teacher is built without drop path even when the student has it.
    """
    for name, child in list(module.named_children()):
        if type(child).__name__ == "DropPath":  # timm's; Identity is what timm builds for drop_path_rate=0
            setattr(module, name, nn.Identity())
        elif isinstance(child, nn.modules.dropout._DropoutNd):
            child.p = 0.0  # kept as a module: timm's attention reads `attn_drop.p`
        else:
            strip_stochastic_depth(child)


class MomentumTeacher(nn.ModuleDict):
    """EMA copies of named student modules.

    Args:
        students: ``{"encoder": encoder, "head": projector, ...}``; each is deep-copied (same weights).
        start, end: the momentum's cosine schedule (BYOL: 0.99 -> 1; DINO: 0.996 -> 1; MoCo v3: 0.99 -> 1).
        stochastic_depth: keep the students' drop path and dropout in the copies (off in DINO and BYOL).

    Example:
        >>> teacher = MomentumTeacher({"encoder": enc, "head": head}, start=0.99)
        >>> with torch.no_grad():
        ...     target = teacher["head"](teacher["encoder"](x))
        >>> teacher.update_from({"encoder": enc, "head": head}, step, total_steps)   # after optimiser.step()
    """

    def __init__(self, students: dict[str, nn.Module], start: float, end: float = 1.0,
                 stochastic_depth: bool = False) -> None:
        if not 0.0 <= start <= 1.0 or not 0.0 <= end <= 1.0:
            raise ValueError(f"teacher momentum must be in [0, 1], got start={start}, end={end}")
        super().__init__({name: copy.deepcopy(module) for name, module in students.items()})
        self.start, self.end = float(start), float(end)
        if not stochastic_depth:
            strip_stochastic_depth(self)
        self.requires_grad_(False)

    def momentum(self, step: int, total_steps: int) -> float:
        return cosine_momentum(step, total_steps, self.start, self.end)

    @torch.no_grad()
    def update_from(self, students: dict[str, nn.Module], step: int, total_steps: int) -> float:
        """One EMA step towards ``students`` (same names as at construction); returns the momentum used."""
        if set(students) != set(self.keys()):
            raise ValueError(f"teacher holds {sorted(self.keys())}, update got {sorted(students)}")
        m = self.momentum(step, total_steps)
        teacher = [p for name in self.keys() for p in self[name].parameters()]
        student = [p.detach() for name in self.keys() for p in students[name].parameters()]
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, student, alpha=1.0 - m)
        return m
