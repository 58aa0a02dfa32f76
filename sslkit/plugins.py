"""Fill the registries: import sslkit's own component packages and the user's plug-in modules.

Each component module registers itself when it is imported (``@OBJECTIVES.register(...)`` at module level,
as timm's models do); the registry itself imports nothing of the package. :func:`load_all` is the one place
that imports them all, for the CLI, the recipe checks and the engine.

Plug-ins: modules named in ``$SSLKIT_PLUGINS`` (comma-separated, importable from ``sys.path`` or
``$PYTHONPATH``) are imported after sslkit's own, in every process, DDP workers included, so a user's
objective, encoder, augmentation or dataset is registered wherever a run needs it::

    SSLKIT_PLUGINS=my_simsiam PYTHONPATH=examples sslkit pretrain examples/simsiam_fmnist.yaml
"""

from __future__ import annotations

import importlib
import os

from sslkit.registry import RegistryError

PLUGINS_ENV = "SSLKIT_PLUGINS"
COMPONENT_PACKAGES = ("sslkit.augment", "sslkit.data", "sslkit.encoders", "sslkit.objectives")


def plugin_modules() -> list[str]:
    """The module names listed in ``$SSLKIT_PLUGINS``."""
    return [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]


def load_all() -> None:
    """Import sslkit's component packages and every plug-in module (each registers on import).

    A plug-in that cannot be imported, or that raises while it registers, is reported as a
    :class:`~sslkit.registry.RegistryError` naming the module, the error and where to look.
    """
    for package in COMPONENT_PACKAGES:
        importlib.import_module(package)
    for module in plugin_modules():
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise RegistryError(f"cannot import plug-in module {module!r} from ${PLUGINS_ENV}: {e}. Put its folder "
                                "on PYTHONPATH (or install it) and check the module name.") from None
        except RegistryError:
            raise
        except Exception as e:  # noqa: BLE001 - a plug-in's own bug, reported in one line
            raise RegistryError(f"plug-in module {module!r} from ${PLUGINS_ENV} failed while importing: "
                                f"{type(e).__name__}: {e}. Fix the module or remove it from ${PLUGINS_ENV}.") from None
