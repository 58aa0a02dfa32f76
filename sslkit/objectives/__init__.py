"""SSL objectives: each owns its heads, teacher and loss state, never the optimiser.

Each module here registers its objective in :data:`sslkit.registry.OBJECTIVES` with a config dataclass when it
is imported, and this package imports every module in it: a new objective is one file here (or in a plug-in
module named by ``$SSLKIT_PLUGINS``) plus a recipe, and nothing else changes.
"""

import importlib
import pkgutil

from sslkit.objectives.base import Objective, Views

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Objective", "Views"]
