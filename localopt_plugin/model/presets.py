"""Named model presets: the one place where model sizes are written down.

``localopt-train --preset NAME`` starts from a preset and any flag given overrides it; the
launch scripts, the main job, the benchmarks and the tests all pick their model here, so the
configuration that is tested is the one that ships. Every preset has the architecture users
train: rotary positions, RMSNorm, SwiGLU, no biases, untied output layer, grouped-query
attention, no dropout.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from typing import Any

from localopt_plugin.errors import UserError
from localopt_plugin.model.config import ModelConfig

ARCHITECTURE: dict[str, Any] = dict(
    position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
    disable_bias_linear=True, untie_embeddings_and_output_weights=True,
    group_query_attention=True, hidden_dropout=0.0, attention_dropout=0.0,
)


def _preset(**sizes: int) -> dict[str, Any]:
    return dict(ARCHITECTURE, **sizes)


PRESETS: dict[str, dict[str, Any]] = {
    # the paper's two sizes
    "110m": _preset(num_layers=12, hidden_size=768, ffn_hidden_size=2560,
                    num_attention_heads=12, num_query_groups=4),
    "770m": _preset(num_layers=24, hidden_size=1536, ffn_hidden_size=5120,
                    num_attention_heads=16, num_query_groups=4),
    # CPU-sized models
    "tiny": _preset(num_layers=2, hidden_size=128, ffn_hidden_size=384,  # smoke runs
                    num_attention_heads=4, num_query_groups=2),
    "main": _preset(num_layers=4, hidden_size=128, ffn_hidden_size=384,  # the main job
                    num_attention_heads=4, num_query_groups=2),
    "bench": _preset(num_layers=4, hidden_size=256, ffn_hidden_size=704,  # localopt-bench
                     num_attention_heads=4, num_query_groups=2),
    "test": _preset(num_layers=2, hidden_size=64, ffn_hidden_size=128,  # the test suite
                    num_attention_heads=4, num_query_groups=2),
}


def preset_values(name: str) -> dict[str, Any]:
    """The flag values (argparse dests) of a preset."""
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise UserError(f"unknown --preset {name!r}; presets: {', '.join(PRESETS)}") from None


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a preset, with fields overridden."""
    return dataclasses.replace(ModelConfig(**preset_values(name)), **overrides)


def config_with_flags(name: str, flags: str = "", **overrides: Any) -> ModelConfig:
    """A preset's ModelConfig with Megatron model flags (a string, as users type them) and
    fields overridden: what benchmarks take as ``--model-flags``."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    ModelConfig.add_args(parser)
    parser.set_defaults(**preset_values(name))
    args, unknown = parser.parse_known_args(shlex.split(flags))
    if unknown:
        raise UserError(f"not model flags: {' '.join(unknown)}")
    return dataclasses.replace(ModelConfig.from_args(args), **overrides)


def add_preset_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="start from a named model (the model presets of "
                        "localopt_plugin/model/presets.py; the benches' --preset names their "
                        "own sizes); flags given override it")


def apply_preset(parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """Make ``--preset``'s values the parser's defaults, so given flags still win."""
    known, _ = parser.parse_known_args(argv)
    if getattr(known, "preset", None):
        parser.set_defaults(**preset_values(known.preset))


def megatron_flags(name: str) -> list[str]:
    """The preset as Megatron-LM flags, for launch scripts of Megatron-LM's own ``pretrain()``
    (which has no ``--preset``)."""
    flags = []
    for dest, value in preset_values(name).items():
        flag = "--" + dest.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False:
            flags += [flag, str(value)]
    return flags


if __name__ == "__main__":  # python -m localopt_plugin.model.presets 110m -> its flags
    print(" ".join(megatron_flags(sys.argv[1])))
