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


def _run(args: argparse.Namespace, explicit: set[str]) -> int:
    """The flags resolved once: :func:`prepare` before any process group (a refused flag or
    bad component setting stops here), :func:`resolve` once the world size is known."""
    from localopt_plugin.training.config import prepare, resolve

    if args.dry_run:  # its JSON alone on stdout: what the libraries print goes to stderr
        from localopt_plugin.training.dry_run import describe
        from localopt_plugin.training.rehearsal import rehearse

        with contextlib.redirect_stdout(sys.stderr):
            world = int(os.environ.get("WORLD_SIZE", "1"))
            config, parts = resolve(args, world, prepare(args, explicit), explicit)
            described = describe(config, parts.source, world)
            described["rehearsal"] = rehearse(config, parts)
        print(json.dumps(described, indent=2, default=str))
        return 0
    prepared = prepare(args, explicit)
    from localopt_plugin.model import ParallelConfig
    from localopt_plugin.training.distributed import init_distributed
    from localopt_plugin.training.loop import configure_logging, train

    init_distributed(ParallelConfig.from_args(args), args.seed)
    import torch.distributed as dist

    configure_logging()
    train(*resolve(args, dist.get_world_size(), prepared, explicit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
