"""``localopt-bench speed``: what a Local Opt. step costs against a full-sequence step.

Every candidate window start is measured (the window draw is random; users pay its expectation
and must provision for its worst case), interleaved with full-sequence and with full-sequence
under Megatron's selective and full activation recomputation (what a user would pick otherwise
to save memory), on the same model and batch, for several repetitions. Each timed step is the
real trainer step: the DeepSpeed engine's forward, backward and optimizer step; the forward +
backward part is timed too. Reported per row: median step time, peak memory (the allocator's:
``torch.cuda.max_memory_allocated`` on GPU; on CPU the peak of the bytes torch's allocator
holds during the step, from the profiler's allocation events, which counts kept keys/values,
logits and transients), optimized (loss-carrying) tokens/s and samples/s. Then, for Local Opt.:
the **expected** step time under the sampler's distribution (what training costs), the
**worst-window** peak memory (what must be provisioned) and the first window's, as ratios to
full-sequence measured in the same run; and Local Opt. at **equal memory**: the largest
micro-batch whose every window stays within full-sequence's peak, and its expected samples/s
against full-sequence's (the speed-up a user who keeps their memory budget gets).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.errors import UserError
from localopt_plugin.objectives import FewerFrames, FullSequence, LocalOptimization, WindowSampler
from localopt_plugin.platform import cuda_available, default_device


@dataclass(frozen=True)
class Preset:
    frames: int
    frame_tokens: int
    window: int
    stride: int
    first_prob: float
    model: str  # a model preset (localopt_plugin/model/presets.py)
    micro_batch: int
    vocab: int
    bf16: bool
    # targets: ratios of Local Opt. to full-sequence in the same run
    expected_step: float
    expected_forward_backward: float
    worst_memory: float
    first_memory: float | None = None


PRESETS = {
    # the paper's setting: 17-frame clips = 5 latent frames x 256 tokens, W = 2, p = 0.5
    "paper17": Preset(5, 256, 2, 1, 0.5, "bench", 1, 8192, False,
                      expected_step=0.50, expected_forward_backward=0.45, worst_memory=0.55,
                      first_memory=0.45),
    # longer videos: 17 latent frames x 256 tokens (65-frame clips)
    "long": Preset(17, 256, 2, 1, 0.5, "bench", 1, 8192, False,
                   expected_step=0.20, expected_forward_backward=0.17, worst_memory=0.25),
    # longer still: 33 latent frames x 256 tokens (129-frame clips)
    "long129": Preset(33, 256, 2, 1, 0.5, "bench", 1, 8192, False,
                      expected_step=0.12, expected_forward_backward=0.10, worst_memory=0.15),
    # on a GPU: the paper's setting at the 110m preset, bf16
    "gpu-paper17": Preset(5, 256, 2, 1, 0.5, "110m", 8, 16384, True,
                          expected_step=0.55, expected_forward_backward=0.55,
                          worst_memory=0.55),
}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper17",
                        help="a setting of this bench (model, clip and window sizes: "
                        "localopt_plugin/bench/speed.py PRESETS), not a model preset")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed steps per row (>= 3; medians are reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--model-flags", default="",
                        help="Megatron model flags over the preset's model, e.g. "
                        "'--num-layers 8 --transformer-impl transformer_engine'")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="default: the preset's")
    parser.add_argument("--context-parallel-size", type=int, default=1,
                        help="> 1: full-sequence and Local Opt. with each sample split over "
                        "this many ranks (head-sharded attention) against one rank: the "
                        "command launches both itself (torchrun, 1 thread per rank)")
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2),
                        help="with --context-parallel-size: DeepSpeed's ZeRO stage of both "
                        "measurements (1-2 partition optimizer state, and 2 gradients, over "
                        "data x context ranks); default 0")
    parser.add_argument("--reduce-bucket-size", type=int, default=None,
                        help="with --zero-stage 1-2: zero_optimization.reduce_bucket_size "
                        "(elements; DeepSpeed's default 5e8 holds a whole small model's "
                        "gradients, and ZeRO-2 allocates a buffer of that size every step)")
    parser.add_argument("--measure-context-parallel", default=None, help=argparse.SUPPRESS)


@dataclass
class Row:
    """One measured configuration: a model (engine), an objective and what it optimizes."""

    name: str
    engine: object
    objective: object
    optimized_tokens: int
    start: int | None = None  # the window start of a Local Opt. row
    step_times: list[float] = dataclasses.field(default_factory=list)
    forward_backward_times: list[float] = dataclasses.field(default_factory=list)
    peak_bytes: int = 0


def fixed_window(first: int, frames: int) -> SimpleNamespace:
    """A window sampler that always draws ``first`` (every window of a step, with several):
    what a measured or planned row runs."""
    return SimpleNamespace(window_frames=frames,
                           draw=lambda iteration, micro_batch, index=0: first)


def _engine(model_config, vocab: int, seed: int, parallel=None, zero_stage: int = 0,
            reduce_bucket_size: int | None = None):
    """A DeepSpeed engine around the trainer's TrainingStep, as localopt-train builds it
    (with Megatron's groups as its mpu under a ``parallel`` layout; ZeRO 0-2 with DeepSpeed's
    defaults otherwise, as ``localopt-train --zero-stage`` without a JSON)."""
    zero = {"stage": zero_stage}
    if reduce_bucket_size is not None:
        zero["reduce_bucket_size"] = reduce_bucket_size
    import deepspeed

    from localopt_plugin.model import build_gpt_model
    from localopt_plugin.training.distributed import MegatronMpu
    from localopt_plugin.training.optim import param_groups
    from localopt_plugin.training.steps import TrainingStep

    model = build_gpt_model(model_config, vocab, seed=seed, parallel=parallel)
    step = TrainingStep(model, None)
    groups = param_groups(step)
    optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=cuda_available())
    config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1,
              "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": zero,
              "bf16": {"enabled": model_config.bf16},
              "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=step, optimizer=optimizer,
                                           model_parameters=groups, config=config,
                                           mpu=None if parallel is None else MegatronMpu())
    return engine


def _step(row: Row, tokens: torch.Tensor, iteration: int) -> tuple[float, float]:
    """One trainer step; returns (whole step, forward + backward) seconds."""
    sync = torch.cuda.synchronize if cuda_available() else (lambda: None)
    engine = row.engine
    engine.module.objective = row.objective
    sync()
    start = time.perf_counter()
    loss, _, _ = engine(tokens, iteration, 0)
    engine.backward(loss)
    sync()
    middle = time.perf_counter()
    engine.step()
    sync()
    return time.perf_counter() - start, middle - start


def peak_allocated_bytes(fn) -> int:
    """The peak growth of the bytes torch's allocator holds while ``fn()`` runs: CUDA's
    ``max_memory_allocated``; on CPU the peak of the bytes allocated during ``fn()`` and not
    yet freed (:func:`peak_of_allocations`), from the profiler's allocation events (every
    tensor: activations, kept keys/values, logits, transients, gradients). The events' own
    running total is not used: it misses the frees made on threads the profiler does not
    record (gloo's), so with collectives it drifts upward from one profiled step to the next
    while the process's memory does not."""
    if cuda_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    todo = list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        node = todo.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size,
                           node.extra_fields.ptr))
        todo.extend(node.children)
    return peak_of_allocations(events)


def peak_of_allocations(events: Iterable[tuple[int, int, int]]) -> int:
    """The peak of the bytes allocated and not yet freed over ``(time, bytes, address)``
    allocation events (negative bytes: a free). Frees of memory allocated before the first
    event are not counted. An address allocated again with no free seen in between was freed
    unseen: gloo's worker thread can drop a collective's buffer after the caller has, and the
    profiler records no event on that thread. Such memory is counted until the address is
    handed out again (the latest it can have been freed), or to the end if it never is."""
    live: dict[int, int] = {}
    current = peak = 0
    for _, size, address in sorted(events):
        if address in live:  # its free, seen now or missed before this new allocation
            current -= live.pop(address)
        if size > 0:
            live[address] = size
            current += size
        peak = max(peak, current)
    return peak


def run(args: argparse.Namespace) -> dict:
    from localopt_plugin.model.presets import config_with_flags
    from localopt_plugin.training.distributed import init_distributed

    preset = PRESETS[args.preset]
    if args.repeats < 3:
        raise UserError("--repeats must be at least 3 (medians of fewer are noise)")
    layout = SampleLayout(video_start=3, num_frames=preset.frames,
                          frame_tokens=preset.frame_tokens)
    init_distributed(seed=1234)
    base = config_with_flags(preset.model, args.model_flags,
                             max_position_embeddings=layout.input_length, bf16=preset.bf16)
    engines = {
        "none": _engine(base, preset.vocab, 1234),
        "selective": _engine(dataclasses.replace(base, recompute_granularity="selective"),
                             preset.vocab, 1234),
        "full": _engine(dataclasses.replace(base, recompute_granularity="full",
                                            recompute_method="uniform", recompute_num_layers=1),
                        preset.vocab, 1234),
    }
    batch = args.micro_batch_size or preset.micro_batch
    sampler = WindowSampler(preset.frames, preset.window, preset.stride, 1234,
                            first_prob=preset.first_prob)
    window_tokens = batch * preset.window * preset.frame_tokens
    video_tokens = batch * preset.frames * preset.frame_tokens
    rows = [Row("full-sequence", engines["none"], FullSequence(layout), video_tokens),
            Row("full-sequence + selective recompute", engines["selective"],
                FullSequence(layout), video_tokens),
            Row("full-sequence + full recompute", engines["full"], FullSequence(layout),
                video_tokens),
            Row("fewer-frames", engines["none"],
                FewerFrames(layout, fixed_window(0, preset.window)), window_tokens)]
    rows += [Row(f"local-opt, window at frame {s}", engines["none"],
                 LocalOptimization(layout, fixed_window(s, preset.window)), window_tokens, s)
             for s in sampler.starts]
    tokens = torch.randint(0, preset.vocab, (batch, layout.seq_length), device=default_device())
    for repeat in range(args.warmup + args.repeats):
        for row in rows:  # interleaved: machine noise hits every row alike
            step_time, forward_backward = _step(row, tokens, repeat)
            if repeat >= args.warmup:
                row.step_times.append(step_time)
                row.forward_backward_times.append(forward_backward)
    for row in rows:
        row.peak_bytes = peak_allocated_bytes(lambda r=row: _step(r, tokens, 0))
    result = summarize(args, preset, layout, sampler, rows, batch, engines["none"])
    result["equal memory"] = equal_memory(args, preset, layout, sampler, rows, batch)
    return result


def equal_memory(args: argparse.Namespace, preset: Preset, layout: SampleLayout,
                 sampler: WindowSampler, rows: list[Row], batch: int) -> dict:
    """Local Opt. at the largest micro-batch whose every window's peak stays within
    full-sequence's peak at the preset's: the throughput a user who keeps their memory budget
    gets (samples/s against full-sequence's, the expectation over the sampler's windows).
    Searched downwards from an affine guess (two peaks of the worst window), so a guess below
    the true largest is not grown."""
    full = rows[0]
    windows = [r for r in rows if r.start is not None]
    worst = max(windows, key=lambda r: r.peak_bytes)

    def batch_of(size: int) -> torch.Tensor:
        return torch.randint(0, preset.vocab, (size, layout.seq_length), device=default_device())

    # a peak is affine in the micro-batch (what is held once, then per sample): two points
    # of the worst window give the first guess, then every window is measured at it
    per_sample = (peak_allocated_bytes(lambda: _step(worst, batch_of(2 * batch), 0))
                  - worst.peak_bytes) / batch
    micro_batch = batch + int((full.peak_bytes - worst.peak_bytes) // max(per_sample, 1))
    peaks: dict[int, int] = {}
    while micro_batch > batch:
        tokens = batch_of(micro_batch)
        peaks = {r.start: peak_allocated_bytes(lambda r=r, t=tokens: _step(r, t, 0))
                 for r in windows}
        if max(peaks.values()) <= full.peak_bytes:
            break
        micro_batch -= 1
    full_samples = batch / statistics.median(full.step_times)
    if micro_batch <= batch:
        return {"micro batch": batch, "note": "no larger micro-batch fits full-sequence's peak",
                "throughput ratio": None}
    times: dict[int, list[float]] = {r.start: [] for r in windows}
    for repeat in range(args.warmup + args.repeats):
        for row in windows:
            step_time, _ = _step(row, tokens, repeat)
            if repeat >= args.warmup:
                times[row.start].append(step_time)
    probabilities = dict(zip(sampler.starts, sampler.probabilities(), strict=True))
    expected = sum(probabilities[s] * statistics.median(t) for s, t in times.items())
    return {
        "micro batch": micro_batch,
        "full-sequence micro batch": batch,
        "worst-window peak memory (MB)": max(peaks.values()) / 2**20,
        "full-sequence peak memory (MB)": full.peak_bytes / 2**20,
        "expected step (ms)": 1e3 * expected,
        "samples/s": micro_batch / expected,
        "full-sequence samples/s": full_samples,
        "throughput ratio": micro_batch / expected / full_samples,
    }


def summarize(args, preset: Preset, layout: SampleLayout, sampler: WindowSampler,
              rows: list[Row], batch: int, engine) -> dict:
    full = rows[0]
    full_step = statistics.median(full.step_times)
    full_fb = statistics.median(full.forward_backward_times)
    table = []
    for row in rows:
        step = statistics.median(row.step_times)
        table.append({
            "row": row.name,
            "window start": row.start,
            "median step (ms)": 1e3 * step,
            "median forward+backward (ms)": 1e3 * statistics.median(row.forward_backward_times),
            "min / max step (ms)": [1e3 * min(row.step_times), 1e3 * max(row.step_times)],
            "peak memory (MB)": row.peak_bytes / 2**20,
            "optimized tokens/s": row.optimized_tokens / step,
            "samples/s": batch / step,
            "step ratio": step / full_step,
            "forward+backward ratio": statistics.median(row.forward_backward_times) / full_fb,
            "memory ratio": row.peak_bytes / full.peak_bytes,
        })
    windows = [r for r in table if r["window start"] is not None]
    probabilities = dict(zip(sampler.starts, sampler.probabilities(), strict=True))
    expected_step = sum(probabilities[r["window start"]] * r["median step (ms)"]
                        for r in windows) / 1e3
    expected_fb = sum(probabilities[r["window start"]] * r["median forward+backward (ms)"]
                      for r in windows) / 1e3
    worst = max(windows, key=lambda r: r["peak memory (MB)"])
    first = next(r for r in windows if r["window start"] == 0)
    window_tokens = batch * preset.window * preset.frame_tokens
    local = {
        "expected step ratio": expected_step / full_step,
        "expected forward+backward ratio": expected_fb / full_fb,
        "worst-window memory ratio": worst["memory ratio"],
        "worst window start": worst["window start"],
        "first-window memory ratio": first["memory ratio"],
        "expected optimized tokens/s": window_tokens / expected_step,
        "full-sequence optimized tokens/s": table[0]["optimized tokens/s"],
        "window probabilities": probabilities,
    }
    checks = {
        "expected step": (local["expected step ratio"], preset.expected_step),
        "expected forward+backward": (local["expected forward+backward ratio"],
                                      preset.expected_forward_backward),
        "worst-window memory": (local["worst-window memory ratio"], preset.worst_memory),
    }
    if preset.first_memory is not None:
        checks["first-window memory"] = (local["first-window memory ratio"],
                                         preset.first_memory)
    model = engine.module.model.config
    return {
        "preset": args.preset,
        "layout": {"frames": preset.frames, "frame_tokens": preset.frame_tokens,
                   "window": preset.window, "stride": preset.stride,
                   "first_window_prob": preset.first_prob, "micro_batch": batch},
        "model": {"preset": preset.model, "flags": args.model_flags,
                  "layers": model.num_layers, "hidden": model.hidden_size,
                  "heads": model.num_attention_heads, "query groups": model.num_query_groups,
                  "vocab": preset.vocab, "bf16": model.bf16},
        "repeats": args.repeats,
        "warmup": args.warmup,
        "device": torch.cuda.get_device_name() if cuda_available() else
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "memory measure": "torch.cuda.max_memory_allocated above the step's start"
        if cuda_available() else "peak of torch's allocated bytes during the step "
        "(profiler allocation events)",
        "rows": table,
        "local-opt": local,
        "targets": {name: {"ratio": value, "target": target, "met": value <= target}
                    for name, (value, target) in checks.items()},
    }


def format_table(result: dict) -> str:
    columns = ["row", "median step (ms)", "median forward+backward (ms)", "peak memory (MB)",
               "optimized tokens/s", "samples/s", "step ratio", "forward+backward ratio",
               "memory ratio"]
    lines = [
        f"preset {result['preset']}: {result['layout']}, model {result['model']}, median of "
        f"{result['repeats']} steps per row after {result['warmup']} warm-up, on "
        f"{result['device']}; memory: {result['memory measure']}",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in result["rows"]:
        cells = [row[c] if isinstance(row[c], str) else f"{row[c]:.3g}" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    local = result["local-opt"]
    lines.append(
        f"local-opt over the sampler's windows {local['window probabilities']}: expected step "
        f"{local['expected step ratio']:.3f}x, expected forward+backward "
        f"{local['expected forward+backward ratio']:.3f}x full-sequence; peak memory "
        f"{local['worst-window memory ratio']:.3f}x at the worst window (start "
        f"{local['worst window start']}), {local['first-window memory ratio']:.3f}x at the "
        f"first")
    equal = result.get("equal memory")
    if equal and equal["throughput ratio"] is not None:
        lines.append(
            f"local-opt at equal memory: micro-batch {equal['micro batch']} (full-sequence "
            f"{equal['full-sequence micro batch']}), worst-window peak "
            f"{equal['worst-window peak memory (MB)']:.3g} MB <= full-sequence's "
            f"{equal['full-sequence peak memory (MB)']:.3g} MB: {equal['samples/s']:.3g} "
            f"samples/s expected, {equal['throughput ratio']:.2f}x full-sequence's "
            f"{equal['full-sequence samples/s']:.3g}")
    elif equal:
        lines.append(f"local-opt at equal memory: {equal['note']}")
    for name, check in result["targets"].items():
        lines.append(f"target {name}: {check['ratio']:.3f} <= {check['target']} "
                     f"({'met' if check['met'] else 'MISSED'})")
    return "\n".join(lines)


def check_args(args: argparse.Namespace) -> None:
    """Refuse the ZeRO flags where DeepSpeed would not read them (``speed`` and its
    context-parallel comparison share one parser)."""
    if args.reduce_bucket_size is not None and args.zero_stage == 0:
        raise UserError("--reduce-bucket-size is zero_optimization.reduce_bucket_size, which "
                        "DeepSpeed reads in ZeRO stages 1-2: add --zero-stage 1 or 2")
    if args.zero_stage and not (args.context_parallel_size > 1 or args.measure_context_parallel):
        raise UserError("--zero-stage sets the context-parallel comparison's engines (with "
                        "--context-parallel-size N > 1); the other speed rows run ZeRO-0")


def main(args: argparse.Namespace) -> int:
    result = run(args)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
