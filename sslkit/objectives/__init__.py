"""SSL objectives: each owns its heads, teacher and loss state, never the optimiser.

Registered in :data:`sslkit.registry.OBJECTIVES` with a config dataclass, so a recipe's ``objective``
section is validated against that dataclass. A new objective is one file here plus a recipe.
"""

from sslkit.objectives import (
    dino,  # noqa: F401
    mae,  # noqa: F401
    simclr,  # noqa: F401  (registration)
)
from sslkit.objectives.base import Objective

__all__ = ["Objective"]
