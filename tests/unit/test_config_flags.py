"""Flags generated from config fields: each name, default, help and rule in one place, and a
component's flags refused when the run does not use that component."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
from pathlib import Path

import pytest
from helpers.configs import train_args

from localopt_plugin import registry
from localopt_plugin.errors import UserError
from localopt_plugin.model import ParallelConfig
from localopt_plugin.objectives.window_sampler import AdaptiveWindowConfig, WindowConfig
from localopt_plugin.plugin import PluginConfig
from localopt_plugin.regularizers import ReCoConfig
from localopt_plugin.training.config import OptimizerConfig

REPO = Path(__file__).resolve().parents[2]


def _parser(*configs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    for config in configs:
        config.add_args(parser)
    return parser


@pytest.mark.parametrize("config", [WindowConfig, AdaptiveWindowConfig, ReCoConfig,
                                    ParallelConfig, OptimizerConfig])
def test_parsed_defaults_are_the_field_defaults_and_settings_round_trip(config):
    parser = _parser(config)
    assert config.from_args(parser.parse_args([])) == config()
    # every field changed to another valid value, given as the flags config.flags() writes
    changed = {"window_frames": 3, "stride_frames": 2, "first_window_prob": 0.25,
               "floor": 0.5, "decay": 0.5, "weight": 0.3, "pairs": "adjacent-frame",
               "reduction": "mean", "schedule": "linear-warmup", "warmup_iters": 7,
               "target_ratio": 0.2, "states": "final", "tensor_model_parallel_size": 2,
               "pipeline_model_parallel_size": 2, "context_parallel_size": 1,
               "cp_comm_type": ("a2a",), "distributed_timeout_minutes": 5.0,
               "optimizer": "sgd", "lr": 1e-3, "lr_decay_iters": 7,
               "override_opt_param_scheduler": True}
    wanted = dataclasses.replace(config(), **{f.name: changed[f.name]
                                              for f in dataclasses.fields(config)
                                              if f.name in changed})
    assert config.from_args(parser.parse_args(wanted.flags())) == wanted


def test_help_shows_each_field_default_and_choices():
    help_text = " ".join(_parser(ReCoConfig).format_help().split())
    assert "--reco-weight-schedule {constant,linear-warmup,cosine,adaptive}" in help_text
    assert "(default: pre-norm)" in help_text and "(default: 0.1)" in help_text


def test_an_inherited_field_keeps_its_declaring_class_prefix_and_group():
    assert AdaptiveWindowConfig.flag("window_frames") == "--local-opt-window-frames"
    assert AdaptiveWindowConfig.flag("floor") == "--local-opt-adaptive-floor"
    parser = _parser(WindowConfig, AdaptiveWindowConfig)  # the parent's flags are added once
    titles = {g.title: [a.option_strings[0] for a in g._group_actions]
              for g in parser._action_groups}
    assert titles[WindowConfig.GROUP][0] == "--local-opt-window-frames"
    assert titles[AdaptiveWindowConfig.GROUP] == ["--local-opt-adaptive-floor",
                                                 "--local-opt-adaptive-decay"]


def test_a_bench_takes_some_of_a_config_flags():
    parser = argparse.ArgumentParser()
    WindowConfig.add_args(parser, only=("window_frames",))
    assert parser.parse_args(["--local-opt-window-frames", "3"]).local_opt_window_frames == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["--local-opt-stride-frames", "2"])
    assert WindowConfig.from_args(parser.parse_args([])) == WindowConfig()


def test_validation_names_the_generated_flag():
    with pytest.raises(UserError, match="--reco-weight-schedule must be one of"):
        ReCoConfig(schedule="sometimes").validate()
    with pytest.raises(UserError, match="--local-opt-adaptive-decay must be in"):
        AdaptiveWindowConfig(decay=1.0).validate()
    with pytest.raises(UserError, match="--tensor-model-parallel-size must be >= 1"):
        ParallelConfig(tensor_model_parallel_size=0).validate()


@pytest.mark.parametrize(("flags", "message"), [
    (("--synthetic-frames", "4", "--dataset", "recall-tokens"),
     "--synthetic-frames (only with --dataset synthetic-video-tokens)"),
    (("--recall-tokens-gap", "3"), "--recall-tokens-gap (only with --dataset recall-tokens)"),
    (("--reco-states", "final"), "--reco-states (only with --regularizer reco)"),
    (("--local-opt-adaptive-decay", "0.5"),
     "--local-opt-adaptive-decay (only with --window-sampler adaptive)"),
])
def test_flags_of_a_component_the_run_does_not_use_are_refused(flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        PluginConfig.from_args(train_args(*flags))
    # given on the command line at their default value: refused too when the caller knows
    # which flags were given (localopt-train, Megatron-LM's sys.argv)
    args = train_args(*flags[2:])  # the run's other flags, this one not given
    dest = flags[0][2:].replace("-", "_")
    with pytest.raises(UserError, match=re.escape(flags[0])):
        PluginConfig.from_args(args, given={dest})
    PluginConfig.from_args(args)  # not given, at its default: nothing to refuse


def test_the_readme_component_registers_and_its_flags_follow_the_rules():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Registering a component"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n\n")]
    module = types.ModuleType("readme_component")  # dataclasses look their module up
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, "README.md", "exec"), module.__dict__)
        component = registry.get("objective", "my-loss")
        parser = argparse.ArgumentParser()
        registry.add_component_args(parser)
        assert parser.parse_args([]).my_loss_weight == 1.0
        with pytest.raises(UserError, match="--my-loss-weight must be >= 0"):
            component.config.from_args(parser.parse_args(["--my-loss-weight", "-1"]))
        with pytest.raises(UserError, match=re.escape(
                "--my-loss-weight (only with --objective my-loss)")):
            PluginConfig.from_args(train_args("--objective", "local-opt"), given={
                "my_loss_weight"})
    finally:
        registry._REGISTRY["objective"].pop("my-loss", None)
        sys.modules.pop(module.__name__)
