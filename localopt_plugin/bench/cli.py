"""``localopt-bench``: ``speed`` (step time and activation memory per objective) and
``loader`` (video-wds loader throughput against what the benchmark model consumes) and
``quality`` (the paper's ablation: cost and quality of each objective on one dataset)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from localopt_plugin.platform import configure_environment


def main(argv: Sequence[str] | None = None) -> int:
    configure_environment()
    from localopt_plugin.bench import loader, quality, speed

    parser = argparse.ArgumentParser(prog="localopt-bench", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    speed.add_args(commands.add_parser("speed", help=speed.__doc__.splitlines()[0]))
    loader.add_args(commands.add_parser("loader", help=loader.__doc__.splitlines()[0]))
    quality.add_args(commands.add_parser("quality", help=quality.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return {"speed": speed.main, "loader": loader.main, "quality": quality.main}[args.command](
        args)


if __name__ == "__main__":
    sys.exit(main())
