"""``localopt-train``: Megatron-style flags in, a DeepSpeed-trained Megatron-Core GPT out.

Launch with torchrun, the ``deepspeed`` launcher, ``mpirun`` or plain ``python -m
localopt_plugin.commands.train``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from localopt_plugin.platform import configure_environment


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


def main(argv: Sequence[str] | None = None) -> int:
    configure_environment()  # before DeepSpeed is imported
    from localopt_plugin.commands import exit_on_user_error, explicit_dests
    from localopt_plugin.model.presets import apply_preset

    parser = build_parser()
    apply_preset(parser, argv)
    args = parser.parse_args(argv)
    explicit = explicit_dests(parser, argv)
    return exit_on_user_error(lambda: _run(args, explicit))


def _run(args: argparse.Namespace, explicit: set[str]) -> int:
    from localopt_plugin.model import ParallelConfig
    from localopt_plugin.plugin import PluginConfig, keep_recorded_settings
    from localopt_plugin.training import config as train_config
    from localopt_plugin.training.checkpoint import recorded_config
    from localopt_plugin.training.config import RunConfig
    from localopt_plugin.training.megatron_flags import resolve_megatron_flags

    resolve_megatron_flags(args, explicit)  # a refused flag stops before any process group
    notes: list[str] = []
    if args.load and (recorded := recorded_config(args.load)) is not None:
        notes = keep_recorded_settings(args, recorded, explicit)
    # so does a bad window, regularizer or dataset setting (the dataset is built once)
    source = PluginConfig.from_args(args).build(RunConfig.from_args(args).train_iters)
    if args.dry_run:
        from localopt_plugin.training.dry_run import describe

        world = int(os.environ.get("WORLD_SIZE", "1"))
        config, source = train_config.resolve(args, world, source, explicit, tuple(notes))
        print(json.dumps(describe(config, source, world), indent=2, default=str))
        return 0
    from localopt_plugin.training.distributed import init_distributed
    from localopt_plugin.training.loop import configure_logging, train

    parallel = ParallelConfig.from_args(args)
    init_distributed(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                     args.seed, parallel.distributed_backend,
                     parallel.distributed_timeout_minutes)
    import torch.distributed as dist

    configure_logging()
    config, source = train_config.resolve(args, dist.get_world_size(), source, explicit,
                                          tuple(notes))
    train(config, source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
