"""The plugin's configuration: flags -> objective, window sampler, regularizers and dataset.

One road for both entry points. ``localopt-train`` (its :class:`TrainConfig` holds a
:class:`PluginConfig`) and Megatron-LM's hooks (:mod:`localopt_plugin.megatron_lm`) both call
:meth:`PluginConfig.from_args` on the parsed flags, then :meth:`PluginConfig.build` once: the
dataset (manifests read, no samples), and the objective and regularizers checked against the
dataset's layout. Both do so before any process group starts, so a bad setting stops the run
with one line naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from localopt_plugin import registry
from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.data.source import VideoTokenSource
from localopt_plugin.errors import UserError
from localopt_plugin.objectives import Objective, WindowConfig, build_objective
from localopt_plugin.objectives.window_sampler import unused_adaptive_flags


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


def unused_component_flags(args: argparse.Namespace) -> list[str]:
    """Flags of the adaptive sampler or the local-opt objective given without them (refused:
    a setting is never silently ignored)."""
    unused = [f"{flag} (only with --window-sampler adaptive)"
              for flag in unused_adaptive_flags(args)]
    if (getattr(args, "local_opt_full_sequence_share", None) is not None
            and args.objective != "local-opt"):
        unused.append("--local-opt-full-sequence-share (only with --objective local-opt)")
    return unused


def _config(kind: str, name: str, args: argparse.Namespace) -> Any:
    component = registry.get(kind, name)
    return component.config.from_args(args) if component.config is not None else None


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
    def from_args(cls, args: argparse.Namespace) -> PluginConfig:
        """Every component's config from the flags; raises :class:`UserError` naming the flag
        of a bad value (each config validates its own flags)."""
        dataset = dataset_name(args)
        unused = unused_component_flags(args)
        if unused:
            raise UserError(f"{' and '.join(unused)}: given for a component this run does not "
                            "use (see --help): drop them or choose the component")
        return cls(objective=args.objective,
                   objective_config=_config("objective", args.objective, args),
                   window_sampler=args.window_sampler,
                   window=_config("window_sampler", args.window_sampler, args) or WindowConfig(),
                   regularizers=tuple((name, _config("regularizer", name, args))
                                      for name in args.regularizer),
                   dataset=dataset, dataset_config=_config("dataset", dataset, args),
                   seed=args.seed)

    def build_dataset(self) -> VideoTokenSource:
        return registry.get("dataset", self.dataset).build(self.dataset_config, seed=self.seed)

    def build_objective(self, layout: SampleLayout) -> Objective:
        """The objective (and its window sampler), checked against the layout: e.g. a window
        longer than the video is refused naming ``--local-opt-window-frames``."""
        registry.get("objective", self.objective)
        return build_objective(self.objective, layout, sampler=self.window_sampler,
                               window=self.window, config=self.objective_config,
                               seed=self.seed)

    def build_regularizers(self, train_iters: int | None) -> list:
        return [registry.get("regularizer", name).build(config, train_iters=train_iters)
                for name, config in self.regularizers]

    def build(self, train_iters: int | None,
              source: VideoTokenSource | None = None) -> VideoTokenSource:
        """The dataset (unless given), with the objective and regularizers checked against
        it; what each entry point calls before any process group starts."""
        source = source or self.build_dataset()
        self.build_objective(source.layout)
        self.build_regularizers(train_iters)
        return source


def recorded_regularizers(saved: dict) -> dict[str, dict[str, Any]]:
    """The regularizer settings a checkpoint recorded, by name and config field: from a
    localopt-train config (``{"regularizers": [[name, fields]]}``) or from flat flags (a version
    1 config, Megatron-LM's saved args: ``{"regularizer": [...], "reco_weight": ...}``)."""
    if "regularizers" in saved:
        return {name: dict(fields or {}) for name, fields in saved["regularizers"]}
    recorded = {}
    for name in saved.get("regularizer") or ():
        flags = getattr(registry.get("regularizer", name).config, "FLAGS", {})
        recorded[name] = {field: saved[dest] for field, dest in flags.items() if dest in saved}
    return recorded


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
        for field, dest in getattr(config, "FLAGS", {}).items():
            value = recorded[name].get(field, before.get(field))
            if dest in given or value is None or value == getattr(args, dest):
                continue
            flag = "--" + dest.replace("_", "-")
            notes.append(f"{flag} {value}: the checkpoint's setting, kept on resuming (the "
                         f"default is {getattr(args, dest)}; give {flag} to change it)")
            setattr(args, dest, value)
    return notes
