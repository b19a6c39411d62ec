"""``localopt-train``: Megatron-style flags in, a DeepSpeed-trained Megatron-Core GPT out.

Launch with torchrun, the ``deepspeed`` launcher, ``mpirun`` or plain ``python -m``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from localopt_plugin.platform import configure_environment


def main(argv: Sequence[str] | None = None) -> int:
    configure_environment()  # before DeepSpeed is imported
    from localopt_plugin.arguments import parse_args
    from localopt_plugin.training.trainer import configure_logging, train

    args = parse_args(argv)
    if args.dry_run:
        from localopt_plugin.training.dry_run import main as dry_run

        return dry_run(args)
    configure_logging()
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
