"""``localopt-preprocess``: turn videos into video-token webdataset shards (docs/preprocessing.md).

    localopt-preprocess procedural:2400 --output data/procedural
    mpirun -n 8 localopt-preprocess /videos/*.mp4 list.csv --output data/real --fps 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from localopt_plugin.pause_point import pause_point
from localopt_plugin.preprocess.clips import PROCEDURAL_FPS, ClipSpec
from localopt_plugin.preprocess.inputs import list_inputs, resolve_labels, write_procedural_mp4s
from localopt_plugin.preprocess.merge import summary_table, write_dataset_files
from localopt_plugin.preprocess.ranks import Ranks, discover
from localopt_plugin.preprocess.writer import (
    STATE_DIR,
    ShardPlan,
    finished,
    record_path,
    settings_digest,
    write_shard,
)
from localopt_plugin.tokenizers import VideoTokenizer, build_tokenizer


def _resolution(text: str) -> tuple[int, int]:
    """``64`` or ``HxW``."""
    try:
        h, _, w = text.lower().partition("x")
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution {text!r} is not N or HxW") from None


def _tokenizer_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="localopt-preprocess", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*",
                   help="video files, directories (searched recursively), globs, CSV/JSONL lists "
                   "(columns path, label, caption; paths relative to the list), or "
                   "procedural:N[:SEED] (N embedded procedural videos, no files; "
                   "procedural-calm:N[:SEED], procedural-plain:N[:SEED], "
                   "procedural-simple:N[:SEED]: its easier variants; "
                   "procedural-recall:N[:SEED[:OPTIONS]]: long clips whose object hides and "
                   "reappears, OPTIONS split=train|valid|reference,colours=K,hide=START+FRAMES, "
                   "see localopt_plugin/data/recall.py)")
    p.add_argument("--output", required=True, help="directory of shards and manifest.json")
    g = p.add_argument_group("clips")
    g.add_argument("--frames", type=int, default=17, help="frames per clip")
    rate = g.add_mutually_exclusive_group()
    rate.add_argument("--frame-stride", type=int, default=1,
                      help="take every n-th source frame")
    rate.add_argument("--fps", type=float, default=None,
                      help="resample to this frame rate (nearest source frame)")
    g.add_argument("--clips-per-video", type=int, default=1,
                   help="clips per video, evenly spaced (1: from the first frame)")
    g.add_argument("--resolution", type=_resolution, default=(64, 64),
                   help="N or HxW: scale to cover it, then center crop")
    g = p.add_argument_group("tokens and shards")
    g.add_argument("--tokenizer", default="fsq-video", help="registered video tokenizer")
    g.add_argument("--tokenizer-arg", type=_tokenizer_arg, action="append", default=[],
                   metavar="KEY=VALUE", help="tokenizer constructor argument (JSON or string), "
                   "e.g. path=/models/Cosmos-Tokenizer-DV4x8x8")
    g.add_argument("--videos-per-shard", type=int, default=64,
                   help="videos per shard (all their clips); shards are the unit of work "
                   "and of resuming")
    g.add_argument("--shard-prefix", default="train")
    g = p.add_argument_group("labels and captions")
    g.add_argument("--labels-from-dirs", action="store_true",
                   help="label files found in directories/globs by their parent folder name")
    g.add_argument("--num-classes", type=int, default=None,
                   help="class count for integer labels (default: the largest label + 1)")
    g.add_argument("--train-text-tokenizer", action="store_true",
                   help="train a sentencepiece model on the captions; the manifest then uses "
                   "text conditioning")
    g.add_argument("--text-vocab-size", type=int, default=1000,
                   help="sentencepiece pieces at most")
    g.add_argument("--max-text-tokens", type=int, default=32,
                   help="caption tokens per sample recorded in the manifest")
    g = p.add_argument_group("running")
    g.add_argument("--threads", type=int, default=1,
                   help="torch threads per rank; scale out with ranks instead: on a busy 2-core "
                   "machine 2 threads made the embedded tokenizer 70x slower than 1")
    g.add_argument("--merge-timeout", type=float, default=1800.0,
                   help="without MPI: seconds rank 0 waits for the other ranks without progress")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--write-procedural-mp4", type=int, default=None, metavar="N",
                   help="instead: write N procedural videos as mp4 + videos.csv into --output")
    g.add_argument("--procedural-frames", type=int, default=None,
                   help="frames per written procedural mp4 (default: enough for the clips)")
    return p


def _work(args: argparse.Namespace, ranks: Ranks, plan: ShardPlan, inputs: list,
          spec: ClipSpec, tokenizer: VideoTokenizer, settings: str) -> dict:
    """Write this rank's unfinished shards; returns its statistics for the summary."""
    stats = {"rank": ranks.rank, "written": 0, "reused": 0, "videos": 0, "clips": 0,
             "rejects": 0, "seconds": 0.0}
    todo = []
    for shard in plan.owned(ranks.rank, ranks.world):
        if finished(args.output, plan.name(shard), settings):
            stats["reused"] += 1
        else:
            todo.append(shard)
    bar = tqdm(total=sum(len(plan.videos(s)) for s in todo), unit="video",
               desc=f"rank {ranks.rank}", position=ranks.rank, disable=args.no_progress)
    start = time.perf_counter()

    def on_video(clips: int) -> None:  # a video without clips was rejected
        stats["videos"] += 1
        stats["clips"] += clips
        stats["rejects"] += clips == 0
        rate = stats["clips"] / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(samples=stats["clips"], clips_per_s=f"{rate:.1f}", refresh=False)
        bar.update(1)

    for shard in todo:
        write_shard(args.output, plan, shard, inputs, spec, tokenizer, ranks.rank, settings,
                    on_video)
        stats["written"] += 1
        pause_point("preprocess-shard", stats["written"])  # where kill tests stop it
    stats["seconds"] = time.perf_counter() - start
    bar.close()
    return stats


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    height, width = args.resolution
    spec = ClipSpec(args.frames, args.frame_stride, args.fps, args.clips_per_video, height,
                    width)
    if min(args.frames, args.frame_stride, args.clips_per_video, args.videos_per_shard,
           height, width) < 1 or (args.fps is not None and args.fps <= 0):
        parser.error("frames, stride, fps, clips per video, videos per shard and resolution "
                     "must be positive")
    if args.write_procedural_mp4 is not None:
        frames = args.procedural_frames or args.clips_per_video * spec.span(PROCEDURAL_FPS)
        listing = write_procedural_mp4s(args.output, args.write_procedural_mp4, frames,
                                        max(height, width), fps=int(PROCEDURAL_FPS))
        print(f"wrote {args.write_procedural_mp4} procedural mp4 files and {listing}")
        return 0
    if not args.inputs:
        parser.error("no inputs")

    ranks = discover()
    torch.set_num_threads(args.threads)
    inputs, num_classes, class_names = resolve_labels(
        list_inputs(args.inputs, args.labels_from_dirs), args.num_classes)
    tokenizer = build_tokenizer(args.tokenizer, **dict(args.tokenizer_arg))
    try:
        grid = tokenizer.latent_grid(args.frames, height, width)
    except ValueError as err:
        parser.error(f"tokenizer {args.tokenizer}: {err}")
    plan = ShardPlan(len(inputs), args.videos_per_shard, args.shard_prefix)
    settings = settings_digest(inputs, spec, args.tokenizer, tokenizer.fingerprint, plan)
    state_dir = os.path.join(args.output, STATE_DIR)
    os.makedirs(state_dir, exist_ok=True)
    ranks.clear_stale(state_dir)

    stats = _work(args, ranks, plan, inputs, spec, tokenizer, settings)

    def missing_records() -> int:
        return sum(not os.path.exists(record_path(args.output, plan.name(i)))
                   for i in range(plan.num_shards))

    everyone = ranks.gather(stats, state_dir, missing_records, args.merge_timeout)
    if everyone is None:
        return 0
    totals = write_dataset_files(
        args.output, plan, spec, args.tokenizer, tokenizer.fingerprint, tokenizer.vocab_size,
        grid, num_classes, class_names, settings,
        args.text_vocab_size if args.train_text_tokenizer else None, args.max_text_tokens)
    print(f"\nlocalopt-preprocess: {ranks.world} rank(s) via {ranks.launcher}, tokenizer "
          f"{args.tokenizer}, {args.frames} frames at {height}x{width}")
    print(summary_table(everyone, totals, args.output, plan))
    sys.stdout.flush()
    return 0



def main(argv: list[str] | None = None) -> int:
    from localopt_plugin.commands import exit_on_user_error

    return exit_on_user_error(lambda: _main(argv))

if __name__ == "__main__":
    sys.exit(main())
