"""``localopt-bench``: ``speed`` (step time and peak memory of every window against
full-sequence), ``window-scope`` (one window per step or per micro-batch at DP=2), ``loader``
(video-wds loader throughput against what the benchmark model consumes), ``pipeline`` (what
Local Opt.'s context rows cost between stages of Megatron's pipeline schedule) and ``quality``
(the paper's ablation: cost and quality of each objective on one dataset), ``recall`` (long-range
recall on long clips: full-sequence against Local Opt. at shares of its compute),
``recall-tokens`` (the fast token-level recall task: recall against FLOPs per variant) and ``plan``
(memory per GPU, FLOPs and what fits, predicted before a run)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from localopt_plugin.platform import configure_environment


def _main(argv: Sequence[str] | None = None) -> int:
    configure_environment()
    from localopt_plugin.bench import (
        context_parallel,
        loader,
        pipeline,
        planner,
        quality,
        recall,
        recall_tokens,
        speed,
        windows,
    )

    parser = argparse.ArgumentParser(prog="localopt-bench", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    speed.add_args(commands.add_parser("speed", help=speed.__doc__.splitlines()[0]))
    loader.add_args(commands.add_parser("loader", help=loader.__doc__.splitlines()[0]))
    quality.add_args(commands.add_parser("quality", help=quality.__doc__.splitlines()[0]))
    recall.add_args(commands.add_parser("recall", help=recall.__doc__.splitlines()[0]))
    recall_tokens.add_args(commands.add_parser("recall-tokens",
                                               help=recall_tokens.__doc__.splitlines()[0]))
    windows.add_args(commands.add_parser("window-scope",
                                         help=windows.__doc__.splitlines()[0]))
    pipeline.add_args(commands.add_parser("pipeline", help=pipeline.__doc__.splitlines()[0]))
    planner.add_args(commands.add_parser("plan", help=planner.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    if args.command == "speed":
        speed.check_args(args)
        if args.context_parallel_size > 1 or args.measure_context_parallel:
            return context_parallel.main(args)
    run = {"speed": speed.main, "loader": loader.main, "quality": quality.main,
           "recall": recall.main, "recall-tokens": recall_tokens.main,
           "window-scope": windows.main, "pipeline": pipeline.main,
           "plan": planner.main}[args.command]
    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    from localopt_plugin.commands import exit_on_user_error

    return exit_on_user_error(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
