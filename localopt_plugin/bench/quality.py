"""``localopt-bench quality``: the paper's ablation on one dataset and one model.

Trains full-sequence, fewer-frames, local-opt (uniform windows), local-opt + first-frame
balancing, and local-opt + balancing + ReCo, each (a) for the same number of steps and (b) for
the training time full-sequence needed (equal measured compute), with the real trainer
(``localopt-train``, DeepSpeed). Then, for every run: training cost (time, video tokens seen,
peak memory), validation full-sequence NLL overall, on late frames and per frame (the
error-accumulation curve), and the temporal consistency of generated videos (optical-flow
warping error) when the data has a decodable tokenizer. Writes ``results.json`` and a markdown
table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

PRESETS = {
    # minutes on 2 CPU cores
    "cpu": {"model": ["--preset", "tiny"],
            "micro_batch": 4, "iters": 150, "window": 2, "eval_samples": 48, "generate": 4},
    # one GPU, about an hour
    "gpu": {"model": ["--preset", "110m", "--bf16"],
            "micro_batch": 16, "iters": 3000, "window": 2, "eval_samples": 512, "generate": 12},
}


@dataclass(frozen=True)
class Variant:
    name: str
    flags: tuple[str, ...]


VARIANTS = (
    Variant("full-sequence", ("--objective", "full-sequence")),
    Variant("fewer-frames", ("--objective", "fewer-frames", "--window-sampler", "uniform")),
    Variant("local-opt (uniform)", ("--objective", "local-opt", "--window-sampler", "uniform")),
    Variant("local-opt + balance", ("--objective", "local-opt", "--window-sampler",
                                    "first-frame-balanced",
                                    "--local-opt-first-window-prob", "0.5")),
    Variant("local-opt + balance + ReCo", ("--objective", "local-opt", "--window-sampler",
                                           "first-frame-balanced",
                                           "--local-opt-first-window-prob", "0.5",
                                           "--regularizer", "reco", "--reco-weight", "0.1",
                                           "--reco-reduction", "mean")),
)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--data-path", nargs="+", required=True, help="training shards")
    parser.add_argument("--valid-data-path", nargs="+", required=True,
                        help="validation shards (NLL curve)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--iters", type=int, default=None, help="override the preset's steps")
    parser.add_argument("--i3d", default=None, help="TorchScript I3D file: adds FVD")
    parser.add_argument("--real-videos", default=None,
                        help="directory of real videos for FVD (with --i3d)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--variants", nargs="+", default=None,
                        choices=[v.name for v in VARIANTS],
                        help="run only these (full-sequence is always run: it sets the budget)")


def _train(args: argparse.Namespace, preset: dict, variant: Variant, tag: str,
           extra: list[str]) -> dict:
    """One trainer run (a subprocess, like a user's launch); returns its cost figures."""
    run_dir = os.path.join(args.out, tag)
    os.makedirs(run_dir, exist_ok=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    cmd = [sys.executable, "-m", "localopt_plugin.commands.train", *preset["model"],
           "--dataset", "video-wds", "--data-path", *args.data_path,
           "--micro-batch-size", str(preset["micro_batch"]), "--lr", "1e-3", "--min-lr", "1e-4",
           "--lr-warmup-iters", "10", "--lr-decay-style", "cosine", "--seed", str(args.seed),
           "--local-opt-window-frames", str(preset["window"]), "--log-interval", "50",
           "--save", os.path.join(run_dir, "checkpoint"), "--metrics-file", metrics,
           "--progress", "off", *variant.flags, *extra]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())})
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in open(metrics)]
    train_seconds = sum(r["step time (s)"] for r in records)
    return {
        "variant": variant.name,
        "steps": len(records),
        "train time (s)": train_seconds,
        "wall time (s)": wall,
        "video tokens seen": sum(r["video tokens/s"] * r["step time (s)"] for r in records),
        "peak memory (MB)": max(r["memory (MB)"] for r in records),
        "final lm loss": records[-1]["lm loss"],
        "checkpoint": os.path.join(run_dir, "checkpoint"),
    }


def run(args: argparse.Namespace) -> dict:
    if args.i3d and not args.real_videos:
        raise SystemExit("error: --i3d needs --real-videos (the reference set for FVD)")
    preset = dict(PRESETS[args.preset])
    iters = args.iters or preset["iters"]
    os.makedirs(args.out, exist_ok=True)
    variants = [v for v in VARIANTS
                if args.variants is None or v.name in args.variants or v is VARIANTS[0]]
    same_steps, equal_compute = [], []
    for variant in variants:
        slug = variant.name.replace(" ", "").replace("+", "_").replace("(", "").replace(")", "")
        same_steps.append(_train(args, preset, variant, f"steps-{slug}",
                                 ["--train-iters", str(iters)]))
    budget = same_steps[0]["train time (s)"]  # what full-sequence needed
    for variant, measured in zip(variants[1:], same_steps[1:], strict=True):
        slug = variant.name.replace(" ", "").replace("+", "_").replace("(", "").replace(")", "")
        # the steps this variant fits in the budget at its measured speed: the LR schedule
        # then completes, as full-sequence's did; the time limit still caps the run
        steps = int(budget / (measured["train time (s)"] / measured["steps"]))
        equal_compute.append(_train(args, preset, variant, f"compute-{slug}",
                                    ["--train-iters", str(steps),
                                     "--exit-duration-in-mins", f"{budget / 60:.6f}"]))
    equal_compute.insert(0, same_steps[0])
    for row in same_steps + equal_compute[1:]:
        row.update(evaluate_checkpoint(row["checkpoint"], args, preset, row["variant"]))
    return {"preset": args.preset, "iters": iters, "same steps": same_steps,
            "equal compute": equal_compute}


def evaluate_checkpoint(checkpoint: str, args: argparse.Namespace, preset: dict,
                        variant: str) -> dict:
    """Validation NLL (overall, late frames, per frame) and generated-video consistency.

    Every model generates the way it must: full context, except fewer-frames, which can only
    generate chunk by chunk (each W-frame chunk conditioned on the previous one).
    """
    run_dir = os.path.dirname(checkpoint)
    py = [sys.executable, "-m"]
    nll_file = os.path.join(run_dir, "nll.json")
    subprocess.run([*py, "localopt_plugin.commands.evaluate", "nll", "--checkpoint", checkpoint,
                    "--data-path", *args.valid_data_path, "--num-samples",
                    str(preset["eval_samples"]), "--out", nll_file], check=True)
    with open(nll_file) as f:
        nll = json.load(f)
    samples = os.path.join(run_dir, "samples")
    mode = ["--mode", "chunked", "--chunk-frames", str(preset["window"])] if (
        variant == "fewer-frames") else ["--mode", "full"]
    labels = [str(i) for i in range(preset["generate"])]
    subprocess.run([*py, "localopt_plugin.commands.generate", "--checkpoint", checkpoint,
                    "--out", samples, "--class-labels", *labels, "--top-k", "50",
                    "--seed", str(args.seed), "--no-progress", *mode], check=True)
    flow_file = os.path.join(run_dir, "flow.json")
    subprocess.run([*py, "localopt_plugin.commands.evaluate", "flow", samples, "--out", flow_file],
                   check=True)
    with open(flow_file) as f:
        flow = json.load(f)
    per_frame = nll["per_frame_nll"]
    row = {"valid NLL": nll["mean_nll"], "late-frame NLL": per_frame[-1],
           "NLL per frame": per_frame, "flow warp error": flow["mean"]}
    if args.i3d:
        fvd_file = os.path.join(run_dir, "fvd.json")
        subprocess.run([*py, "localopt_plugin.commands.evaluate", "fvd", "--i3d", args.i3d,
                        "--real", args.real_videos, "--generated", samples, "--out", fvd_file],
                       check=True)
        with open(fvd_file) as f:
            row["FVD"] = json.load(f)["fvd"]
    return row


def format_tables(result: dict) -> str:
    columns = ["variant", "steps", "train time (s)", "video tokens seen", "peak memory (MB)",
               "valid NLL", "late-frame NLL", "flow warp error", "FVD"]
    out = []
    for title in ("same steps", "equal compute"):
        out += [f"### {title}", "", "| " + " | ".join(columns) + " |",
                "|" + "---|" * len(columns)]
        for row in result[title]:
            cells = [row.get(c, "n/a") for c in columns]
            out.append("| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c)
                                         for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = format_tables(result)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    return 0
