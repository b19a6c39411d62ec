"""The registry at the centre: components are registered by kind and name and selected by flags.

Every kind shares one contract: a component is a **build function** and, optionally, a frozen
**config dataclass** deriving from :class:`~localopt_plugin.config_flags.FlagConfig`, whose
fields are its flags (name, default, help and rule in one place)::

    @dataclass(frozen=True)
    class MyLossConfig(FlagConfig):
        PREFIX: ClassVar[str] = "--my-"
        my_weight: float = option(1.0, "the loss's weight")  # --my-my-weight

        def validate(self):
            if self.my_weight < 0:
                raise UserError(f"{self.flag('my_weight')} must be >= 0")

    @register("objective", "my-loss", config=MyLossConfig)
    def build_my_loss(config, **context): ...

The commands add every registered config's flags to their parser (``add_component_args``), turn
the chosen components' flags into configs once (``config_from_args``) and call
``build(kind, name, config, **context)``; the context each kind receives is listed in
``CONTEXT``. The package's own components register when their package is imported (the modules
that look a kind up import it, so the layer test sees the dependency); third-party packages add
components through the Python entry-point group ``localopt_plugin.components``: each entry point
names a module (or a callable) that registers its components when loaded.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from localopt_plugin.errors import UserError

log = logging.getLogger(__name__)

# kind -> the keyword arguments its build function receives besides the config
CONTEXT = {
    "objective": "layout (SampleLayout), windows (a function making the run's WindowSampler)",
    "regularizer": "train_iters (int)",
    "dataset": "seed (int)",
    "tokenizer": "(none)",
    "window_sampler": "num_frames (int), seed (int)",
}
KINDS = tuple(CONTEXT)
ENTRY_POINT_GROUP = "localopt_plugin.components"


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    build: Callable[..., Any]
    config: type | None = None  # a dataclass with from_args(args) (and add_args(parser))


_REGISTRY: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
_entry_points_loaded = False


class UnknownComponentError(UserError, KeyError):
    """A name that is not registered; the message lists the valid names (a user's setting:
    the commands print it as one ``error:`` line)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def _check_kind(kind: str) -> None:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown component kind {kind!r}; kinds are: {', '.join(KINDS)}")


def register(kind: str, name: str, *, config: type | None = None) -> Callable:
    """Decorator registering a build function (or class) under ``kind``/``name``."""
    _check_kind(kind)

    def decorator(build: Callable) -> Callable:
        existing = _REGISTRY[kind].get(name)
        if existing is not None and (existing.build != build or existing.config is not config):
            raise ValueError(f"{kind} {name!r} is already registered by {existing.build!r}")
        _REGISTRY[kind][name] = Component(kind, name, build, config)
        return build

    return decorator


def discover() -> None:
    """Load the third-party components of the entry points (once)."""
    global _entry_points_loaded
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
    discover()
    return sorted(_REGISTRY[kind])


def get(kind: str, name: str) -> Component:
    """The registered component, or an error listing every registered name of that kind."""
    _check_kind(kind)
    discover()
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY[kind])) or "(none)"
        raise UnknownComponentError(
            f"unknown {kind} {name!r}; registered {kind}s: {valid}"
        ) from None


def config_from_args(kind: str, name: str, args: argparse.Namespace) -> Any:
    """The component's config built from parsed flags (None for a component without one)."""
    component = get(kind, name)
    return component.config.from_args(args) if component.config is not None else None


def build(kind: str, name: str, config: Any = None, /, **context: Any) -> Any:
    """Build a component from its config and the kind's context (see ``CONTEXT``)."""
    return get(kind, name).build(config, **context)


def add_component_args(parser: argparse.ArgumentParser, kinds: tuple[str, ...] = KINDS) -> None:
    """Add the flags of every registered component config of ``kinds`` (each flag once)."""
    seen: set[type] = set()
    for kind in kinds:
        for name in names(kind):
            config = _REGISTRY[kind][name].config
            if config is not None and config not in seen and hasattr(config, "add_args"):
                seen.add(config)
                config.add_args(parser)
