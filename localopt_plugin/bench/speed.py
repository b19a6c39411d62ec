"""``localopt-bench speed``: step time, throughput and activation memory of the objectives.

full-sequence, local-opt and fewer-frames run on the same model, the same micro-batch and the
same window draws, interleaved step by step so machine noise hits all alike. Each step is a
forward, backward and AdamW update. Activation memory is what autograd keeps for backward:
on CPU the bytes of the distinct tensors packed by saved-tensor hooks (parameters excluded),
measured in a separate forward with the same window as the timed step; on GPU the peak of
``torch.cuda.max_memory_allocated`` above the memory held before the step. Wall time is the
claim; the process's CPU time is printed beside it because it is far less sensitive to other
jobs on a shared machine (a large gap between the two ratios flags a noisy run).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.objectives.sequence import FewerFrames, FullSequence, LocalOptimization
from localopt_plugin.objectives.window_sampler import WindowSampler
from localopt_plugin.platform import cuda_available, default_device


@dataclass(frozen=True)
class Preset:
    frames: int
    frame_tokens: int
    window: int
    stride: int
    first_prob: float
    # targets (ratios to full-sequence) from the issue that introduced the benchmark
    max_time_ratio: float
    max_memory_ratio: float


PRESETS = {
    "paper17": Preset(frames=5, frame_tokens=256, window=2, stride=1, first_prob=0.5,
                      max_time_ratio=0.50, max_memory_ratio=0.45),
    "long": Preset(frames=17, frame_tokens=256, window=2, stride=1, first_prob=0.5,
                   max_time_ratio=0.30, max_memory_ratio=0.20),
}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper17")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per objective (>= 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--model-flags", default="",
                        help="Megatron flags for the model, e.g. '--num-layers 8 --bf16'")


def saved_activation_bytes(fn, params: set[int]) -> tuple[int, object]:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(storages.values()), result


def run(args: argparse.Namespace) -> dict:
    from localopt_plugin.arguments import build_parser
    from localopt_plugin.model import build_gpt_model
    from localopt_plugin.training.distributed import init_distributed

    preset = PRESETS[args.preset]
    if args.steps < 5:
        raise SystemExit("error: --steps must be at least 5 (medians of fewer are noise)")
    layout = SampleLayout(video_start=3, num_frames=preset.frames,
                          frame_tokens=preset.frame_tokens)
    model_args = build_parser().parse_args([
        "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--micro-batch-size", "1",
        *args.model_flags.split(),
    ])
    model_args.max_position_embeddings = layout.input_length
    init_distributed(seed=model_args.seed)
    vocab = 8192
    model = build_gpt_model(model_args, vocab_size=vocab)
    device = default_device()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = model_args.micro_batch_size
    tokens = torch.randint(0, vocab, (batch, layout.seq_length), device=device)

    def sampler(first_prob):
        return WindowSampler(preset.frames, preset.window, preset.stride, model_args.seed,
                             first_prob=first_prob)

    objectives = {
        "full-sequence": FullSequence(layout),
        "local-opt": LocalOptimization(layout, sampler(preset.first_prob)),
        "fewer-frames": FewerFrames(layout, sampler(None)),
    }
    times = {name: [] for name in objectives}
    cpu_times = {name: [] for name in objectives}
    memory = {name: [] for name in objectives}
    for step in range(args.warmup + args.steps):
        for name, objective in objectives.items():
            if cuda_available():
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            start, cpu_start = time.perf_counter(), time.process_time()
            out = objective(model, tokens, step, 0)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda_available():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            cpu_elapsed = time.process_time() - cpu_start
            if step < args.warmup:
                continue
            times[name].append(elapsed)
            cpu_times[name].append(cpu_elapsed)
            if cuda_available():
                memory[name].append(torch.cuda.max_memory_allocated() - base)
            else:
                nbytes, _ = saved_activation_bytes(
                    lambda o=objective, i=step: o(model, tokens, i, 0), params)
                memory[name].append(nbytes)

    video_tokens = batch * layout.num_frames * layout.frame_tokens
    base_time = statistics.median(times["full-sequence"])
    base_mem = statistics.median(memory["full-sequence"])
    rows = []
    for name in objectives:
        median_time = statistics.median(times[name])
        median_mem = statistics.median(memory[name])
        rows.append({
            "objective": name,
            "median step (ms)": 1e3 * median_time,
            "mean step (ms)": 1e3 * statistics.fmean(times[name]),
            "video tokens/s": video_tokens / median_time,
            "median activations (MB)": median_mem / 2**20,
            "max activations (MB)": max(memory[name]) / 2**20,
            "median CPU time (ms)": 1e3 * statistics.median(cpu_times[name]),
            "time ratio": median_time / base_time,
            "CPU time ratio": statistics.median(cpu_times[name]) / statistics.median(
                cpu_times["full-sequence"]),
            "mean time ratio": statistics.fmean(times[name]) / statistics.fmean(
                times["full-sequence"]),
            "memory ratio": median_mem / base_mem,
        })
    local = next(r for r in rows if r["objective"] == "local-opt")
    return {
        "preset": args.preset,
        "layout": {"frames": preset.frames, "frame_tokens": preset.frame_tokens,
                   "window": preset.window, "stride": preset.stride,
                   "first_window_prob": preset.first_prob, "micro_batch": batch},
        "model": {"layers": model_args.num_layers, "hidden": model_args.hidden_size,
                  "heads": model_args.num_attention_heads, "vocab": vocab,
                  "bf16": model_args.bf16},
        "steps": args.steps,
        "warmup": args.warmup,
        "device": torch.cuda.get_device_name() if cuda_available() else
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "memory_measure": "cuda max_memory_allocated" if cuda_available() else
        "saved-tensor hooks",
        "rows": rows,
        "targets": {
            "time ratio": preset.max_time_ratio, "memory ratio": preset.max_memory_ratio,
            "time met": local["time ratio"] <= preset.max_time_ratio,
            "memory met": local["memory ratio"] <= preset.max_memory_ratio,
        },
    }


def format_table(result: dict) -> str:
    columns = ["objective", "median step (ms)", "mean step (ms)", "video tokens/s",
               "median CPU time (ms)", "median activations (MB)", "max activations (MB)",
               "time ratio", "mean time ratio", "CPU time ratio", "memory ratio"]
    lines = [
        f"preset {result['preset']}: {result['layout']}, model {result['model']}, "
        f"{result['steps']} steps after {result['warmup']} warm-up, on {result['device']}",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in result["rows"]:
        cells = [row[c] if isinstance(row[c], str) else f"{row[c]:.3g}" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    t = result["targets"]
    lines.append(
        f"local-opt targets: time ratio <= {t['time ratio']} "
        f"({'met' if t['time met'] else 'MISSED'}), memory ratio <= {t['memory ratio']} "
        f"({'met' if t['memory met'] else 'MISSED'})"
    )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
