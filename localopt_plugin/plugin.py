"""The plugin's configuration: flags -> objective, window sampler, regularizers and dataset.

One road for both entry points. ``localopt-train`` (:func:`~localopt_plugin.training.config.
prepare`) and Megatron-LM's hooks (:func:`~localopt_plugin.megatron_lm.plugin_setup`) both call
:meth:`PluginConfig.from_args` once on the parsed flags and build its parts once: the dataset
(manifests read, no samples), the objective checked against the dataset's layout and the
regularizers (:class:`PluginParts`), which the executor then uses. Both do so before any process
group starts, so a bad setting stops the run with one line naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from localopt_plugin import (  # noqa: F401  the packages whose built-in components register
    data,
    objectives,
    registry,
    regularizers,
)
from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.data.source import VideoTokenSource
from localopt_plugin.errors import UserError
from localopt_plugin.objectives import Objective, WindowConfig, build_objective


def add_plugin_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The plugin's own flags: component choices and every registered component's flags
    (windows, ReCo, datasets). Usable as Megatron-LM's ``extra_args_provider``."""
    g = parser.add_argument_group("localopt-plugin")
    g.add_argument("--objective", default="full-sequence",
                   help="training loss, a registered objective: "
                   "full-sequence | local-opt | fewer-frames | ...")
    g.add_argument("--regularizer", nargs="*", default=[],
                   help="registered regularizers added to the loss, e.g. reco")
    g.add_argument("--dataset", default=None,
                   help="registered dataset providing video-token samples (default: video-wds "
                   "with --data-path, else synthetic-video-tokens)")
    g.add_argument("--window-sampler", default="first-frame-balanced",
                   help="registered window sampler for local-opt / fewer-frames")
    registry.add_component_args(parser)
    return parser


def dataset_name(args: argparse.Namespace) -> str:
    """``--dataset``, or its default: video-wds when ``--data-path`` is given (Megatron's
    meaning: data), else the built-in synthetic tokens. A dataset that reads no
    ``--data-path`` is refused together with one."""
    name = args.dataset or ("video-wds" if args.data_path else "synthetic-video-tokens")
    config = registry.get("dataset", name).config
    reads_paths = config is not None and "data_path" in {
        f.name for f in dataclasses.fields(config)}
    if not reads_paths:
        given = [flag for flag, value in (("--data-path", args.data_path),
                                          ("--valid-data-path",
                                           getattr(args, "valid_data_path", None))) if value]
        if given:
            raise UserError(f"--dataset {name} does not read {' or '.join(given)}: use "
                            f"--dataset video-wds (the default with --data-path) or drop "
                            f"{' and '.join(given)}")
    return name


def unused_component_flags(args: argparse.Namespace, chosen: list[tuple[str, str]],
                           given: set[str] | None = None) -> list[str]:
    """Flags of registered components this run does not use (``chosen``: its ``(kind, name)``
    pairs), given on the command line (``given``: their dests) or, without that list, set to
    another value than their default: refused, a setting is never silently ignored."""
    used = {registry.get(kind, name).config for kind, name in chosen} - {None}
    used_dests = {config.dest(f.name) for config in used if hasattr(config, "flag_fields")
                  for f in config.flag_fields()}
    unused = {}
    for kind in registry.KINDS:
        for name in registry.names(kind):
            config = registry.get(kind, name).config
            if config in used or not hasattr(config, "changed_fields"):
                continue
            for field in config.changed_fields(args, given):
                if config.dest(field) not in used_dests:
                    unused.setdefault(config.flag(field), []).append(
                        f"--{kind.replace('_', '-')} {name}")
    return [f"{flag} (only with {' or '.join(owners)})" for flag, owners in unused.items()]


@dataclass(frozen=True)
class PluginConfig:
    """What the plugin adds to a run, as validated configs (each component's own dataclass)."""

    objective: str = "full-sequence"
    objective_config: Any = None
    window_sampler: str = "first-frame-balanced"
    window: WindowConfig = WindowConfig()
    regularizers: tuple[tuple[str, Any], ...] = ()
    dataset: str = "synthetic-video-tokens"
    dataset_config: Any = None
    seed: int = 1234

    @classmethod
    def from_args(cls, args: argparse.Namespace, given: set[str] | None = None) -> PluginConfig:
        """Every component's config from the flags; raises :class:`UserError` naming the flag
        of a bad value (each config validates its own flags) or of a component this run does
        not use (``given``: the dests on the command line; see :func:`unused_component_flags`)."""
        dataset = dataset_name(args)
        chosen = [("objective", args.objective), ("window_sampler", args.window_sampler),
                  ("dataset", dataset), *(("regularizer", name) for name in args.regularizer)]
        unused = unused_component_flags(args, chosen, given)
        if unused:
            raise UserError(f"{' and '.join(unused)}: given for a component this run does not "
                            "use (see --help): drop them or choose the component")
        return cls(objective=args.objective,
                   objective_config=registry.config_from_args("objective", args.objective, args),
                   window_sampler=args.window_sampler,
                   window=(registry.config_from_args("window_sampler", args.window_sampler, args)
                           or WindowConfig()),
                   regularizers=tuple((name, registry.config_from_args("regularizer", name,
                                                                       args))
                                      for name in args.regularizer),
                   dataset=dataset,
                   dataset_config=registry.config_from_args("dataset", dataset, args),
                   seed=args.seed)

    def build_dataset(self) -> VideoTokenSource:
        return registry.get("dataset", self.dataset).build(self.dataset_config, seed=self.seed)

    def build_objective(self, layout: SampleLayout) -> Objective:
        """The objective (and its window sampler), checked against the layout: e.g. a window
        longer than the video is refused naming ``--local-opt-window-frames``."""
        return build_objective(self.objective, layout, sampler=self.window_sampler,
                               window=self.window, config=self.objective_config,
                               seed=self.seed)

    def build_regularizers(self, train_iters: int | None) -> tuple:
        return tuple(registry.get("regularizer", name).build(config, train_iters=train_iters)
                     for name, config in self.regularizers)

    def build(self, train_iters: int | None) -> PluginParts:
        """The dataset, the objective checked against it and the regularizers, each built
        once: what an entry point calls before any process group starts."""
        source = self.build_dataset()
        return PluginParts(source, self.build_objective(source.layout),
                           self.build_regularizers(train_iters))


@dataclass(frozen=True)
class PluginParts:
    """The plugin's parts of one run, built once from its :class:`PluginConfig` and handed to
    the executor (the objective keeps the window sampler's state)."""

    source: VideoTokenSource
    objective: Objective
    regularizers: tuple = ()


def recorded_regularizers(saved: dict) -> dict[str, dict[str, Any]]:
    """The regularizer settings a checkpoint recorded, by name and config field: from a
    localopt-train config (``{"regularizers": [[name, fields]]}``) or from flat flags (a version
    1 config, Megatron-LM's saved args: ``{"regularizer": [...], "reco_weight": ...}``)."""
    if "regularizers" in saved:
        return {name: dict(fields or {}) for name, fields in saved["regularizers"]}
    recorded = {}
    for name in saved.get("regularizer") or ():
        config = registry.get("regularizer", name).config
        recorded[name] = {f.name: saved[config.dest(f.name)] for f in _flag_fields(config)
                          if config.dest(f.name) in saved}
    return recorded


def _flag_fields(config: type | None) -> list:
    return config.flag_fields() if hasattr(config, "flag_fields") else []


def keep_recorded_settings(args: argparse.Namespace, saved: dict,
                           given: set[str]) -> list[str]:
    """A resumed run keeps the regularizer settings its checkpoint trained with, for every flag
    not ``given`` on the command line (defaults change: ``--reco-states`` was ``final`` until the
    ReCo sweep). A field the checkpoint did not record takes the value runs without it trained
    with (the config's ``RECORDED_BEFORE``). Returns one note per kept setting."""
    notes = []
    recorded = recorded_regularizers(saved)
    for name in args.regularizer:
        if name not in recorded:
            continue
        config = registry.get("regularizer", name).config
        before = getattr(config, "RECORDED_BEFORE", {})
        for field in _flag_fields(config):
            dest = config.dest(field.name)
            value = recorded[name].get(field.name, before.get(field.name))
            if dest in given or value is None or value == getattr(args, dest):
                continue
            flag = config.flag(field.name)
            notes.append(f"{flag} {value}: the checkpoint's setting, kept on resuming (the "
                         f"default is {getattr(args, dest)}; give {flag} to change it)")
            setattr(args, dest, value)
    return notes
