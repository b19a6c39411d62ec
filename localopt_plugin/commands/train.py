"""``localopt-train``: Megatron-style flags in, a DeepSpeed-trained Megatron-Core GPT out.

Launch with torchrun, the ``deepspeed`` launcher, ``mpirun`` or plain ``python -m
localopt_plugin.commands.train``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence

from localopt_plugin.platform import configure_environment
from localopt_plugin.training.parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    configure_environment()  # before DeepSpeed is imported
    from localopt_plugin.commands import exit_on_user_error, explicit_dests
    from localopt_plugin.model.presets import apply_preset

    parser = build_parser()
    apply_preset(parser, argv)
    args = parser.parse_args(argv)
    explicit = explicit_dests(parser, argv)
    return exit_on_user_error(lambda: _run(args, explicit))


def _plugin_source(args: argparse.Namespace, explicit: set[str]):
    """Flags resolved (a refused flag, window, regularizer or dataset setting stops here, before
    any process group) and the dataset built once; the notes of settings kept from --load."""
    from localopt_plugin.plugin import PluginConfig, keep_recorded_settings
    from localopt_plugin.training.checkpoint import recorded_config
    from localopt_plugin.training.config import RunConfig
    from localopt_plugin.training.megatron_flags import resolve_megatron_flags

    resolve_megatron_flags(args, explicit)
    notes: list[str] = []
    if args.load and (recorded := recorded_config(args.load)) is not None:
        notes = keep_recorded_settings(args, recorded, explicit)
    return PluginConfig.from_args(args).build(RunConfig.from_args(args).train_iters), notes


def _run(args: argparse.Namespace, explicit: set[str]) -> int:
    from localopt_plugin.model import ParallelConfig
    from localopt_plugin.training import config as train_config

    if args.dry_run:  # its JSON alone on stdout: what the libraries print goes to stderr
        from localopt_plugin.training.dry_run import describe

        with contextlib.redirect_stdout(sys.stderr):
            source, notes = _plugin_source(args, explicit)
            world = int(os.environ.get("WORLD_SIZE", "1"))
            config, source = train_config.resolve(args, world, source, explicit, tuple(notes))
            described = describe(config, source, world)
        print(json.dumps(described, indent=2, default=str))
        return 0
    source, notes = _plugin_source(args, explicit)
    from localopt_plugin.training.distributed import init_distributed
    from localopt_plugin.training.loop import configure_logging, train

    parallel = ParallelConfig.from_args(args)
    init_distributed(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                     args.seed, parallel.distributed_backend,
                     parallel.distributed_timeout_minutes, parallel.context_parallel_size)
    import torch.distributed as dist

    configure_logging()
    config, source = train_config.resolve(args, dist.get_world_size(), source, explicit,
                                          tuple(notes))
    train(config, source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
