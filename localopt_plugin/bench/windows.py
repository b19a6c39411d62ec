"""``localopt-bench window-scope``: one window per step or one per micro-batch, at DP=2.

Two measurements of the trade-off behind ``--local-opt-window-scope``:

* **gradient variance over window draws**, exactly: for fixed micro-batches of the built-in
  synthetic videos (class textures moving frame to frame: structured, like real video tokens),
  the gradient of every (micro-batch, window start) pair is computed once; the variance of the
  step's gradient under each scope then follows in closed form from the sampler's
  probabilities (no sampling noise). ``step`` draws one window shared by the step's
  micro-batches; ``micro-batch`` draws them independently. Reported relative to the squared
  norm of the expected gradient;
* **step time at DP=2**: two real ``localopt-train`` runs under torchrun (2 ranks, one micro-
  batch each) with either scope, median and mean step time from their metrics. With
  ``micro-batch`` a step lasts as long as the longer of the two ranks' windows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

from localopt_plugin.bench.speed import fixed_window
from localopt_plugin.metric_names import STEP_TIME
from localopt_plugin.objectives import LocalOptimization, WindowSampler


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=5, help="latent frames per sample")
    parser.add_argument("--frame-tokens", type=int, default=256)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--first-window-prob", type=float, default=0.5)
    parser.add_argument("--micro-batches", type=int, default=2,
                        help="micro-batches per step (the data-parallel size)")
    parser.add_argument("--batches", type=int, default=8,
                        help="steps' worth of data the variance is averaged over")
    parser.add_argument("--iters", type=int, default=40, help="timed iterations per scope")
    parser.add_argument("--model-flags", default="",
                        help="Megatron model flags over the 'bench' preset")
    parser.add_argument("--json", default=None, help="write the results here")


def gradient_variance(args: argparse.Namespace) -> dict:
    """Relative variance of the step gradient under each scope (exact over the draws)."""
    from localopt_plugin.data.synthetic import SyntheticConfig, synthetic_video_tokens
    from localopt_plugin.model import build_gpt_model
    from localopt_plugin.model.presets import config_with_flags
    from localopt_plugin.training.distributed import init_distributed

    source = synthetic_video_tokens(SyntheticConfig(args.frames, args.frame_tokens, 1000, 10),
                                    seed=1234)
    layout = source.layout
    init_distributed(seed=1234)
    model = build_gpt_model(config_with_flags("bench", args.model_flags,
                                              max_position_embeddings=layout.input_length),
                            source.vocab.size, seed=1234)
    sampler = WindowSampler(args.frames, args.window, 1, 0, first_prob=args.first_window_prob)
    probs = dict(zip(sampler.starts, sampler.probabilities(), strict=True))
    params = [p for p in model.parameters() if p.requires_grad]
    samples = source.train.batches(1, 0, 1, seed=0)
    results = {"step": [], "micro-batch": []}
    for _ in range(args.batches):
        grads = {}  # (micro-batch, start) -> flat gradient
        for m in range(args.micro_batches):
            tokens = next(samples)["tokens"]
            for s in sampler.starts:
                fixed = fixed_window(s, args.window)
                loss = LocalOptimization(layout, fixed)(model, tokens).loss
                grads[m, s] = torch.cat([g.flatten() for g in
                                         torch.autograd.grad(loss, params)])
        m_count = args.micro_batches
        step_grads = {s: sum(grads[m, s] for m in range(m_count)) / m_count for s in probs}
        mean = sum(probs[s] * step_grads[s] for s in probs)
        norm = float(mean.square().sum())
        step_var = sum(probs[s] * float((step_grads[s] - mean).square().sum()) for s in probs)
        per_micro = sum(
            sum(probs[s] * float((grads[m, s] - sum(probs[t] * grads[m, t] for t in probs))
                                 .square().sum()) for s in probs)
            for m in range(m_count)) / m_count**2
        results["step"].append(step_var / norm)
        results["micro-batch"].append(per_micro / norm)
    return {scope: statistics.fmean(values) for scope, values in results.items()}


def dp2_step_times(args: argparse.Namespace) -> dict:
    """Median/mean step time of 2-rank localopt-train runs with each scope."""
    model = ["--preset", "bench", *args.model_flags.split()]
    out = {}
    with tempfile.TemporaryDirectory(prefix="localopt-window-scope-") as directory:
        for scope in ("step", "micro-batch"):
            metrics = os.path.join(directory, f"{scope}.jsonl")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node=2", "-m", "localopt_plugin.commands.train", *model,
                   "--synthetic-frames", str(args.frames),
                   "--synthetic-frame-tokens", str(args.frame_tokens),
                   "--synthetic-codebook-size", "1000", "--synthetic-num-classes", "10",
                   "--micro-batch-size", "1",
                   "--global-batch-size", "2", "--train-iters", str(args.iters),
                   "--objective", "local-opt", "--local-opt-window-frames", str(args.window),
                   "--local-opt-first-window-prob", str(args.first_window_prob),
                   "--local-opt-window-scope", scope, "--log-interval", str(args.iters),
                   "--metrics-file", metrics, "--progress", "off"]
            subprocess.run(cmd, check=True, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
            with open(metrics) as f:
                times = [json.loads(line)[STEP_TIME] for line in f][2:]  # warm-up
            out[scope] = {"median step (s)": statistics.median(times),
                          "mean step (s)": statistics.fmean(times),
                          "steps": len(times)}
    return out


def main(args: argparse.Namespace) -> int:
    result = {"settings": vars(args) | {"json": None},
              "relative gradient variance": gradient_variance(args),
              "DP=2 step time": dp2_step_times(args)}
    variance, times = result["relative gradient variance"], result["DP=2 step time"]
    lines = ["| scope | relative gradient variance | DP=2 median step (s) | DP=2 mean step (s) |",
             "|---|---|---|---|"]
    for scope in ("step", "micro-batch"):
        lines.append(f"| {scope} | {variance[scope]:.4g} | "
                     f"{times[scope]['median step (s)']:.4g} | "
                     f"{times[scope]['mean step (s)']:.4g} |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
