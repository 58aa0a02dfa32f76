"""One strict registry type for encoders, augmentations, objectives and datasets.

Factories are registered by name with a decorator (as in timm's model registry) and built with
``REGISTRY.build(name, **kwargs)``. An unknown name, or a keyword the factory does not take, raises an
error that lists what is valid instead of failing later somewhere deep inside.

Example::

    ENCODERS = Registry("encoder")

    @ENCODERS.register("resnet18_cifar")
    def resnet18_cifar(**kw): ...

    enc = ENCODERS.build("resnet18_cifar")
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_ERROR_CHARS = 2000
# The most layers or blocks a registered component builds from one recipe number (ViT depth, ResNet stage depth,
# head layers, MAE decoder depth). Even on the meta device each layer is a Python object, so a recipe asking for
# 10**12 of them would exhaust memory before the parameter count could be checked.
MAX_LAYERS = 256


def check_layers(what: str, n: int, low: int = 1) -> None:
    """Refuse a layer count outside ``[low, MAX_LAYERS]`` with a ValueError naming ``what``."""
    if not isinstance(n, int) or isinstance(n, bool) or not low <= n <= MAX_LAYERS:
        raise ValueError(f"{what} must be an integer from {low} to {MAX_LAYERS}, got {n!r}")


def error_line(error: BaseException | str) -> str:
    """A user error as the one line the CLI prints: its first non-empty line (a wrapped library error may carry a
    native stack trace below it), at most ``MAX_ERROR_CHARS`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


class RegistryError(KeyError):
    """Unknown name or bad arguments for a registered factory."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    config: type | None  # optional dataclass describing the factory's recipe section
    help: str


class Registry:
    """A named table of factories.

    Args:
        kind: what is registered ("encoder", "objective", ...); used in error messages.
        prefix_factories: optional ``{"timm": fn}`` where ``build("timm:resnet50")`` calls
            ``fn("resnet50", **kwargs)``, for open-ended families such as any timm model.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._prefixes: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, *, config: type | None = None, help: str = "") -> Callable:
        """Decorator that registers ``factory`` under ``name``."""

        def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise RegistryError(f"{self.kind} {name!r} is registered twice")
            doc = help or (inspect.getdoc(factory) or "").split("\n")[0]
            self._entries[name] = Entry(name, factory, config, doc)
            return factory

        return deco

    def register_prefix(self, prefix: str, factory: Callable[..., Any]) -> None:
        self._prefixes[prefix] = factory

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries or self._prefix_of(name) is not None

    def _prefix_of(self, name: str) -> str | None:
        if ":" in name and name.split(":", 1)[0] in self._prefixes:
            return name.split(":", 1)[0]
        return None

    def get(self, name: str) -> Entry:
        if name in self._entries:
            return self._entries[name]
        prefix = self._prefix_of(name)
        if prefix is not None:
            fn = self._prefixes[prefix]
            rest = name.split(":", 1)[1]
            return Entry(name, lambda **kw: fn(rest, **kw), None, f"{prefix} model {rest}")
        valid = ", ".join(self.names() + [f"{p}:<name>" for p in self._prefixes])
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RegistryError(f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {valid}.")

    def build(self, name: str, **kwargs: Any) -> Any:
        """Call the factory registered as ``name``; unknown keywords are named in the error."""
        entry = self.get(name)
        _check_kwargs(entry.factory, kwargs, f"{self.kind} {name!r}")
        return entry.factory(**kwargs)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def _check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], what: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise RegistryError(
            f"{what} got unknown argument(s) {unknown}. It accepts: {sorted(accepted) or 'no arguments'}."
        )


ENCODERS = Registry("encoder")
AUGMENTATIONS = Registry("augmentation")
OBJECTIVES = Registry("objective")
DATASETS = Registry("dataset")

ALL = {"encoders": ENCODERS, "augmentations": AUGMENTATIONS, "objectives": OBJECTIVES, "datasets": DATASETS}
