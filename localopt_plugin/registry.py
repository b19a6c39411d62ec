"""The registry at the centre: components are registered by kind and name and selected by flags.

Kinds: ``objective`` (the training loss), ``regularizer``, ``dataset``, ``tokenizer`` and
``window_sampler``. Third-party packages add components through the Python entry-point group
``localopt_plugin.components``: each entry point names a module (or a callable) that registers
its components when loaded.

    @register("objective", "my-loss")
    class MyLoss: ...

    build("objective", "my-loss", **kwargs)
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

log = logging.getLogger(__name__)

KINDS = ("objective", "regularizer", "dataset", "tokenizer", "window_sampler")
ENTRY_POINT_GROUP = "localopt_plugin.components"
# Modules of this package that register each kind's built-in components (imported on first use
# of that kind only: a tokenizer lookup need not import Megatron-Core).
_BUILTIN_MODULES = {
    "objective": "localopt_plugin.objectives",
    "window_sampler": "localopt_plugin.objectives",
    "regularizer": "localopt_plugin.regularizers",
    "dataset": "localopt_plugin.data",
    "tokenizer": "localopt_plugin.tokenizers",
}

_REGISTRY: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_entry_points_loaded = False

T = TypeVar("T")


class UnknownComponentError(KeyError):
    """A name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def _check_kind(kind: str) -> None:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown component kind {kind!r}; kinds are: {', '.join(KINDS)}")


def register(kind: str, name: str) -> Callable[[T], T]:
    """Decorator registering a class or factory under ``kind``/``name``."""
    _check_kind(kind)

    def decorator(obj: T) -> T:
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing is not obj:
            raise ValueError(f"{kind} {name!r} is already registered by {existing!r}")
        _REGISTRY[kind][name] = obj
        return obj

    return decorator


def discover(kind: str | None = None) -> None:
    """Import the built-in components of ``kind`` (all kinds if None) and, once, the
    third-party entry points."""
    global _entry_points_loaded
    for module in {_BUILTIN_MODULES[k] for k in ([kind] if kind else KINDS)}:
        importlib.import_module(module)
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        loaded = ep.load()
        if callable(loaded) and not isinstance(loaded, type):
            loaded()  # a registration function; a module registers on import
        log.info("loaded localopt_plugin components from entry point %s (%s)", ep.name, ep.value)


def names(kind: str) -> list[str]:
    _check_kind(kind)
    discover(kind)
    return sorted(_REGISTRY[kind])


def get(kind: str, name: str) -> Any:
    """The registered class/factory, or an error listing every registered name of that kind."""
    _check_kind(kind)
    discover(kind)
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY[kind])) or "(none)"
        raise UnknownComponentError(
            f"unknown {kind} {name!r}; registered {kind}s: {valid}"
        ) from None


def build(kind: str, name: str, /, **kwargs: Any) -> Any:
    return get(kind, name)(**kwargs)
