"""``localopt-bench loader``: video-wds loader throughput against what training consumes.

Writes temporary shards of procedural tokens on the paper17 grid (5 latent frames x 16x16),
streams them through the ``video-wds`` loader (DataLoader workers, shuffling, validation,
input building) and reports the median samples/s and MB/s of shard bytes over several runs,
after each run's first batch (worker start and the first shuffle-buffer fill are reported
apart). The consumer is ``localopt-bench speed``'s default model taking full-sequence
training steps (forward, backward, AdamW) on the same machine; the loader must deliver at
least ``--min-ratio`` times its samples/s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
import webdataset as wds

from localopt_plugin.data.manifest import Manifest, shard_sample_counts
from localopt_plugin.platform import cuda_available, default_device

GRID = (5, 16, 16)  # paper17: 5 latent frames x 256 tokens
VIDEO_VOCAB = 8192  # the vocabulary of bench/speed.py's model
NUM_CLASSES = 10


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=4096, help="samples written to shards")
    parser.add_argument("--shard-samples", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--runs", type=int, default=3, help="loader runs (median reported)")
    parser.add_argument("--batches", type=int, default=1024, help="timed batches per run")
    parser.add_argument("--model-steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--model-flags", default="",
                        help="Megatron flags for the consuming model (as in bench speed)")
    parser.add_argument("--min-ratio", type=float, default=20.0,
                        help="loader samples/s over model samples/s to meet")
    parser.add_argument("--json", default=None, help="write the results here")


def write_shards(directory: str, samples: int, shard_samples: int) -> str:
    """Procedural class-conditioned shards and their manifest; returns the brace pattern."""
    rng = np.random.default_rng(0)
    with wds.ShardWriter(os.path.join(directory, "bench-%06d.tar"), maxcount=shard_samples,
                         verbose=0) as sink:
        for i in range(samples):
            sink.write({"__key__": f"clip{i:07d}",
                        "tokens.npy": rng.integers(0, VIDEO_VOCAB, GRID).astype(np.int16),
                        "cls": i % NUM_CLASSES,
                        "json": {"source": f"clip{i}.mp4", "start": 0.0, "fps": 8.0}})
    shards = sorted(f for f in os.listdir(directory) if f.endswith(".tar"))
    Manifest(tokenizer="procedural", tokenizer_fingerprint="sha256:none",
             video_vocab_size=VIDEO_VOCAB, latent_grid=GRID, source_frames=17,
             source_resolution=(256, 256),
             shards=shard_sample_counts(os.path.join(directory, s) for s in shards),
             num_classes=NUM_CLASSES).write(directory)
    return os.path.join(directory, f"bench-{{000000..{len(shards) - 1:06d}}}.tar")


def measure_loader(args: argparse.Namespace, pattern: str) -> dict:
    from localopt_plugin.data.wds import VideoWdsConfig, video_wds

    source = video_wds(VideoWdsConfig(data_path=(pattern,), num_workers=args.workers,
                                      null_condition_prob=0.1))
    directory = os.path.dirname(pattern)
    shard_bytes = sum(os.path.getsize(os.path.join(directory, f))
                      for f in os.listdir(directory) if f.endswith(".tar"))
    bytes_per_sample = shard_bytes / args.samples
    rates, startups = [], []
    for run in range(args.runs):
        start = time.perf_counter()
        stream = source.train.batches(args.micro_batch_size, 0, 1, seed=run)
        next(stream)
        first = time.perf_counter()
        for _ in itertools.islice(stream, args.batches):
            pass
        rates.append(args.batches * args.micro_batch_size / (time.perf_counter() - first))
        startups.append(first - start)
        stream.close()
    rate = statistics.median(rates)
    return {"samples/s": rate, "MB/s": rate * bytes_per_sample / 1e6,
            "runs samples/s": rates, "first batch (s)": statistics.median(startups),
            "bytes/sample": bytes_per_sample, "workers": args.workers,
            "micro batch": args.micro_batch_size}


def measure_model(args: argparse.Namespace) -> dict:
    """Samples/s of full-sequence training steps of bench speed's default model."""
    from localopt_plugin.data.layout import SampleLayout
    from localopt_plugin.model import build_gpt_model
    from localopt_plugin.model.presets import config_with_flags
    from localopt_plugin.objectives.sequence import FullSequence
    from localopt_plugin.training.distributed import init_distributed

    layout = SampleLayout(video_start=3, num_frames=GRID[0], frame_tokens=GRID[1] * GRID[2])
    config = config_with_flags("bench", args.model_flags,
                               max_position_embeddings=layout.input_length)
    init_distributed(seed=1234)
    vocab = VIDEO_VOCAB + 4 + NUM_CLASSES
    model = build_gpt_model(config, vocab_size=vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = FullSequence(layout)
    batch = 1
    tokens = torch.randint(0, vocab, (batch, layout.seq_length), device=default_device())
    times = []
    for step in range(1 + args.model_steps):  # the first step warms up
        start = time.perf_counter()
        objective(model, tokens, step, 0).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_time = statistics.median(times[1:])
    return {"samples/s": batch / step_time, "median step (s)": step_time,
            "layers": config.num_layers, "hidden": config.hidden_size,
            "micro batch": batch}


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="localopt-bench-loader-") as directory:
        pattern = write_shards(directory, args.samples, args.shard_samples)
        loader = measure_loader(args, pattern)
    model = measure_model(args)
    ratio = loader["samples/s"] / model["samples/s"]
    return {
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores"
        + (f", {torch.cuda.get_device_name()}" if cuda_available() else ""),
        "grid": list(GRID), "loader": loader, "model": model, "ratio": ratio,
        "min ratio": args.min_ratio, "met": ratio >= args.min_ratio,
    }


def format_table(result: dict) -> str:
    loader, model = result["loader"], result["model"]
    return "\n".join([
        f"video-wds loader vs. training on {result['machine']} (grid "
        f"{'x'.join(map(str, result['grid']))}, {loader['workers']} workers, micro-batch "
        f"{loader['micro batch']}; first batch after {loader['first batch (s)']:.2f} s)",
        "| | samples/s | MB/s |",
        "|---|---|---|",
        f"| loader (median of {len(loader['runs samples/s'])} runs) | "
        f"{loader['samples/s']:.1f} | {loader['MB/s']:.2f} |",
        f"| model ({model['layers']} layers, hidden {model['hidden']}, full-sequence step "
        f"{model['median step (s)']:.3f} s) | {model['samples/s']:.2f} | "
        f"{model['samples/s'] * loader['bytes/sample'] / 1e6:.3f} |",
        f"loader / model = {result['ratio']:.1f}x (target >= {result['min ratio']:g}x: "
        f"{'met' if result['met'] else 'MISSED'})",
    ])


def main(args: argparse.Namespace) -> int:
    result = run(args)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["met"] else 1
