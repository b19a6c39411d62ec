"""``localopt-train``'s parser: Megatron-LM's flags the trainer honours, the plugin's, and every
other Megatron-LM flag by name (to honour or refuse). Used by the command and by whatever needs
the trainer's flags parsed (benchmarks, tests)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    from localopt_plugin.model import ModelConfig, ParallelConfig
    from localopt_plugin.model.presets import add_preset_arg
    from localopt_plugin.plugin import add_plugin_args
    from localopt_plugin.training.config import add_train_args, add_trainer_args
    from localopt_plugin.training.megatron_flags import add_alias_args, add_megatron_flags

    parser = argparse.ArgumentParser(
        prog="localopt-train",
        description="Train a Megatron-Core GPT on video tokens with DeepSpeed "
        "(Local Optimization + ReCo).",
        epilog="Every other flag of Megatron-LM's parser (and Megatron-DeepSpeed's) is "
        "recognised too: honoured, mapped from its alias, or refused with one error line "
        "saying why. --dry-run shows what each became; docs/from-megatron.md has the table.",
        allow_abbrev=False,
    )
    add_preset_arg(parser)
    ModelConfig.add_args(parser)
    add_train_args(parser)
    ParallelConfig.add_args(parser)
    add_plugin_args(parser)
    add_trainer_args(parser)
    add_alias_args(parser)
    add_megatron_flags(parser)  # last: every other Megatron-LM flag, to honour or refuse
    return parser
