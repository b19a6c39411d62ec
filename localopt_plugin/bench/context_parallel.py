"""``localopt-bench speed --context-parallel-size N``: per-rank peak memory and step time of
full-sequence and Local Opt. (every window) with each sample split over N ranks, against one rank,
in the same command.

The command launches its measurements itself: first one rank (CP=1), then N single-rank runs at
once (CP=1 under the load CP=N puts on the machine, without communication: the floor of the step
ratio this machine allows, reported beside the targets), then N ranks (torchrun, one thread each),
each running the trainer's step (DeepSpeed engine with Megatron's groups, ZeRO-0
unless ``--zero-stage``) for every row: full-sequence, then Local Opt. at each window start of the
sampler. Per row: the median step time of the slowest rank and the largest rank's peak of torch's
allocated bytes (see :func:`~localopt_plugin.bench.speed.peak_allocated_bytes`), the smallest over 3
profiled steps (on CPU each step's figure is an upper bound: buffers of the collectives that gloo's
thread frees count until their address is reused); for Local Opt. the step time expected under the
sampler's window distribution and the worst window's peak. Weights and (below ZeRO-2) gradients are
not split by context parallelism, so the memory ratios are bounded below by their share; the measure
counts what the step allocates (gradients, activations, kept keys/values, communication buffers),
not what lives across steps (weights, optimizer state, ZeRO's preallocated bucket). The optimizer
step of each row and one gradient-sized all-reduce over the ranks are also timed, and the step
ratios without them are reported beside the targets (informational): the part of a step context
parallelism splits. So is what it adds: each row's all-to-alls (the attention's, forward and
backward), recorded in one step and replayed alone, back to back (count, bytes, seconds); a third
ratio takes them out too, leaving the computation, to tell the communication of a machine
(gloo on CPU, NCCL on GPUs) from the split of the work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.errors import UserError
from localopt_plugin.objectives import FullSequence, LocalOptimization, WindowSampler

PROFILED_STEPS = 3
# ratios CP=N / CP=1 the issue set for CP=2 on the `long` preset
TARGETS = {"full-sequence peak": 0.6, "local-opt worst-window peak": 0.7,
           "full-sequence step": 0.65, "local-opt expected step": 0.65}


def main(args: argparse.Namespace) -> int:
    if args.measure_context_parallel:
        measure(args)
        return 0
    result = run(args)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def run(args: argparse.Namespace) -> dict:
    """Measure at CP=1, then N single-rank runs at once (the machine's load at CP=N, no
    communication), then at CP=N, each its own torchrun launch; the summary."""
    if args.repeats < 3:
        raise UserError("--repeats must be at least 3 (medians of fewer are noise)")
    cp = args.context_parallel_size
    with tempfile.TemporaryDirectory() as scratch:
        def measured(ranks: int, runs: int, what: str) -> list[dict]:
            print(f"measuring {what} ...", file=sys.stderr, flush=True)
            outs = [Path(scratch) / f"cp{ranks}-{i}.json" for i in range(runs)]
            launches = [_launch(args, ranks, out) for out in outs]
            try:
                for cmd, proc in launches:
                    if proc.wait():
                        raise UserError(f"the {what} measurement failed (exit "
                                        f"{proc.returncode}): {' '.join(cmd)}")
            finally:  # a failed launch stops the ones made with it (torchrun stops its ranks)
                for _, proc in launches:
                    if proc.poll() is None:
                        proc.terminate()
                        proc.wait()
            return [json.loads(out.read_text()) for out in outs]

        (one,) = measured(1, 1, "CP=1 (1 rank, 1 thread)")
        loaded = _slowest(measured(1, cp, f"CP=1, {cp} runs at once (1 thread each)"))
        (split,) = measured(cp, 1, f"CP={cp} ({cp} ranks, 1 thread each)")
    return summarize(one, split, loaded)


def _launch(args: argparse.Namespace, ranks: int, out: Path) -> tuple[list[str], subprocess.Popen]:
    """One measurement launch (torchrun, ``ranks`` ranks of one thread) writing ``out``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ranks}", "-m", "localopt_plugin.commands.bench", "speed",
           "--preset", args.preset, "--repeats", str(args.repeats), "--warmup",
           str(args.warmup), f"--model-flags={args.model_flags}",
           "--context-parallel-size", str(ranks), "--zero-stage", str(args.zero_stage),
           *(() if args.reduce_bucket_size is None else
             ("--reduce-bucket-size", str(args.reduce_bucket_size))),
           "--measure-context-parallel", str(out)]
    if args.micro_batch_size:
        cmd += ["--micro-batch-size", str(args.micro_batch_size)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return cmd, subprocess.Popen(cmd, env={**env, "OMP_NUM_THREADS": "1"})


def _slowest(runs: list[dict]) -> dict:
    """Runs made at once as one: each row taken from the run whose median step was slowest."""
    rows = [max(same, key=lambda r: statistics.median(r["step times (s)"]))
            for same in zip(*(run["rows"] for run in runs), strict=True)]
    return {**runs[0], "rows": rows}


def _rows(preset, layout: SampleLayout, sampler: WindowSampler, batch: int):
    from localopt_plugin.bench.speed import fixed_window

    yield "full-sequence", None, FullSequence(layout), batch * preset.frames * preset.frame_tokens
    for start in sampler.starts:
        yield (f"local-opt, window at frame {start}", start,
               LocalOptimization(layout, fixed_window(start, preset.window)),
               batch * preset.window * preset.frame_tokens)


def measure(args: argparse.Namespace) -> None:
    """One rank of a measurement launch (``--measure-context-parallel OUT``)."""
    from localopt_plugin.bench.speed import PRESETS, _engine, _step, peak_allocated_bytes
    from localopt_plugin.model import ParallelConfig
    from localopt_plugin.model.presets import config_with_flags
    from localopt_plugin.platform import default_device
    from localopt_plugin.training.distributed import init_distributed

    cp = args.context_parallel_size
    parallel = ParallelConfig(context_parallel_size=cp, cp_comm_type=("a2a",))
    init_distributed(parallel, seed=1234)
    if dist.get_world_size() != cp:
        raise UserError(f"--measure-context-parallel runs on exactly {cp} ranks, not "
                        f"{dist.get_world_size()}")
    preset = PRESETS[args.preset]
    layout = SampleLayout(video_start=3, num_frames=preset.frames,
                          frame_tokens=preset.frame_tokens)
    model = config_with_flags(preset.model, args.model_flags,
                              max_position_embeddings=layout.input_length, bf16=preset.bf16)
    engine = _engine(model, preset.vocab, 1234, parallel=parallel, zero_stage=args.zero_stage,
                     reduce_bucket_size=args.reduce_bucket_size)
    batch = args.micro_batch_size or preset.micro_batch
    sampler = WindowSampler(preset.frames, preset.window, preset.stride, 1234,
                            first_prob=preset.first_prob)
    generator = torch.Generator().manual_seed(1234)  # the same sample on every rank
    tokens = torch.randint(0, preset.vocab, (batch, layout.seq_length),
                           generator=generator).to(default_device())
    rows = []
    for name, start, objective, optimized in _rows(preset, layout, sampler, batch):
        row = SimpleNamespace(engine=engine, objective=objective)
        times, optimizer_times = [], []
        for repeat in range(args.warmup + args.repeats):
            dist.barrier()
            started = time.perf_counter()
            whole, forward_backward = _step(row, tokens, repeat)
            step, optimizer = _largest_over_ranks(time.perf_counter() - started,
                                                  whole - forward_backward)
            if repeat >= args.warmup:
                times.append(step)
                optimizer_times.append(optimizer)
        # the smallest of 3 profiled steps: each is an upper bound of the same peak, raised
        # by the collectives' buffers gloo's thread frees unrecorded (see peak_of_allocations)
        (peak,) = _largest_over_ranks(min(peak_allocated_bytes(lambda r=row: _step(r, tokens, 0))
                                          for _ in range(PROFILED_STEPS)))
        with _recorded_all_to_alls() as calls:
            _step(row, tokens, 0)
        rows.append({"row": name, "window start": start, "step times (s)": times,
                     "optimizer step times (s)": optimizer_times,
                     "peak per rank (bytes)": peak, "optimized tokens": optimized,
                     "all-to-alls per step": len(calls),
                     "all-to-all bytes sent per step": sum(c.input.numel()
                                                           * c.input.element_size()
                                                           for c in calls),
                     "all-to-all times (s)": _replayed_seconds(calls, args.repeats)})
        if dist.get_rank() == 0:
            print(f"CP={cp} {name}: median step {1e3 * statistics.median(times):.1f} ms, peak "
                  f"{peak / 2**20:.1f} MB per rank, {len(calls)} all-to-alls", file=sys.stderr,
                  flush=True)
    reduction = _gradient_all_reduce_seconds(engine, args.repeats)
    if dist.get_rank() == 0:
        Path(args.measure_context_parallel).write_text(json.dumps({
            "gradient all-reduce (s)": reduction,
            "cp": cp, "preset": args.preset, "micro batch": batch, "ZeRO stage": args.zero_stage,
            "reduce bucket size": args.reduce_bucket_size,
            "layout": {"frames": preset.frames, "frame_tokens": preset.frame_tokens,
                       "window": preset.window, "stride": preset.stride,
                       "first_window_prob": preset.first_prob},
            "model": {"preset": preset.model, "flags": args.model_flags,
                      "layers": model.num_layers, "hidden": model.hidden_size,
                      "heads": model.num_attention_heads, "query groups": model.query_groups},
            "window probabilities": dict(zip(sampler.starts, sampler.probabilities(),
                                             strict=True)),
            "repeats": args.repeats, "warmup": args.warmup, "rows": rows}))


def _gradient_all_reduce_seconds(engine, repeats: int) -> float:
    """The median time of one all-reduce of a gradient-sized buffer over the ranks (0 on one
    rank): the communication a context-parallel step adds and cannot split."""
    if dist.get_world_size() == 1:
        return 0.0
    params = [p for p in engine.module.parameters() if p.requires_grad]
    buffer = params[0].new_zeros(sum(p.numel() for p in params))
    return statistics.median(_slowest_rank_seconds(lambda: dist.all_reduce(buffer), repeats))


@contextlib.contextmanager
def _recorded_all_to_alls():
    """Every ``dist.all_to_all_single`` called inside (its arguments), the calls still made."""
    calls = []
    original = dist.all_to_all_single

    def record(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
               async_op=False):
        calls.append(SimpleNamespace(output=output, input=input, group=group,
                                     output_split_sizes=output_split_sizes,
                                     input_split_sizes=input_split_sizes))
        return original(output, input, output_split_sizes, input_split_sizes, group, async_op)

    dist.all_to_all_single = record
    try:
        yield calls
    finally:
        dist.all_to_all_single = original


def _replayed_seconds(calls: list, repeats: int) -> list[float]:
    """The slowest rank's time of the recorded all-to-alls made again alone, back to back, on
    buffers of their sizes: the communication a step spends in them, without waiting for a
    rank still computing. ``repeats`` times after one warm-up."""
    buffers = [(torch.empty_like(c.output), torch.zeros_like(c.input)) for c in calls]

    def replay() -> None:
        for call, (received, sent) in zip(calls, buffers, strict=True):
            dist.all_to_all_single(received, sent, call.output_split_sizes,
                                   call.input_split_sizes, group=call.group)

    return _slowest_rank_seconds(replay, repeats)


def _slowest_rank_seconds(fn, repeats: int) -> list[float]:
    """``fn()``'s time on the slowest rank, the ranks starting together, ``repeats`` times
    after one warm-up; on a GPU until its queued work is done."""
    from localopt_plugin.platform import cuda_available

    sync = torch.cuda.synchronize if cuda_available() else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        started = time.perf_counter()
        fn()
        sync()
        times.extend(_largest_over_ranks(time.perf_counter() - started))
    return times[1:]


def _largest_over_ranks(*values: float) -> list[float]:
    """Each value's largest over the ranks: the slowest rank's time, the largest rank's peak."""
    largest = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return largest.tolist()


def _summary(measured: dict) -> dict:
    rows = measured["rows"]
    full = rows[0]
    windows = rows[1:]
    probabilities = {int(k): v for k, v in measured["window probabilities"].items()}

    def expected(key: str) -> float:
        return sum(probabilities[r["window start"]] * statistics.median(r[key])
                   for r in windows)

    return {
        "full-sequence step": statistics.median(full["step times (s)"]),
        "full-sequence peak": full["peak per rank (bytes)"],
        "local-opt expected step": expected("step times (s)"),
        "local-opt worst-window peak": max(r["peak per rank (bytes)"] for r in windows),
        "full-sequence optimizer step": statistics.median(full["optimizer step times (s)"]),
        "local-opt expected optimizer step": expected("optimizer step times (s)"),
        "full-sequence all-to-alls": statistics.median(full["all-to-all times (s)"]),
        "local-opt expected all-to-alls": expected("all-to-all times (s)"),
    }


def _without_fixed_costs(summary: dict, all_reduce: float, all_to_alls: bool = False) -> dict:
    """Step times less what context parallelism cannot split: the optimizer step and the
    gradient all-reduce (timed alone); with ``all_to_alls`` also less what it adds, the step's
    all-to-alls (replayed alone)."""
    return {name: summary[f"{name} step"] - summary[f"{name} optimizer step"] - all_reduce
            - (summary[f"{name} all-to-alls"] if all_to_alls else 0.0)
            for name in ("full-sequence", "local-opt expected")}


def summarize(one: dict, many: dict, loaded: dict) -> dict:
    """Per row and in total: CP=N against CP=1, with the targets; beside them the floor this
    machine sets, from N single-rank runs at once (``loaded``)."""
    cp = many["cp"]
    table = []
    for base, split, busy in zip(one["rows"], many["rows"], loaded["rows"], strict=True):
        table.append({
            "row": base["row"], "window start": base["window start"],
            "CP=1 median step (ms)": 1e3 * statistics.median(base["step times (s)"]),
            f"CP=1, {cp} at once median step (ms)": 1e3 * statistics.median(
                busy["step times (s)"]),
            f"CP={cp} median step (ms)": 1e3 * statistics.median(split["step times (s)"]),
            f"CP={cp} min / max step (ms)": [1e3 * min(split["step times (s)"]),
                                             1e3 * max(split["step times (s)"])],
            f"CP={cp} all-to-alls per step": split["all-to-alls per step"],
            f"CP={cp} all-to-all MB sent per step": split["all-to-all bytes sent per step"] / 2**20,
            f"CP={cp} all-to-alls alone (ms)": 1e3 * statistics.median(
                split["all-to-all times (s)"]),
            "CP=1 peak (MB)": base["peak per rank (bytes)"] / 2**20,
            f"CP={cp} peak per rank (MB)": split["peak per rank (bytes)"] / 2**20,
            "step ratio": (statistics.median(split["step times (s)"])
                           / statistics.median(base["step times (s)"])),
            "memory ratio": split["peak per rank (bytes)"] / base["peak per rank (bytes)"],
        })
    base, split, busy = _summary(one), _summary(many), _summary(loaded)
    ratios = {name: split[name] / base[name] for name in TARGETS}
    reduction = many["gradient all-reduce (s)"]
    rest = (_without_fixed_costs(base, 0.0), _without_fixed_costs(split, reduction))
    computation = (_without_fixed_costs(base, 0.0, all_to_alls=True),
                   _without_fixed_costs(split, reduction, all_to_alls=True))
    return {
        "preset": one["preset"], "context parallel size": cp, "layout": one["layout"],
        "micro batch": one["micro batch"], "ZeRO stage": one["ZeRO stage"],
        "reduce bucket size": one["reduce bucket size"], "model": one["model"],
        "repeats": one["repeats"], "warmup": one["warmup"],
        "device": f"CPU, {cp} ranks x 1 thread (gloo); CP=1: 1 rank x 1 thread",
        "memory measure": "peak of torch's allocated bytes during the step (profiler "
        "allocation events; a free made unrecorded on gloo's thread is taken when its address "
        "is reused), the largest rank's, the smallest of 3 profiled steps",
        "window probabilities": one["window probabilities"],
        "rows": table,
        "CP=1": base, f"CP={cp}": split, "ratios": ratios,
        f"CP={cp} gradient all-reduce (s)": reduction,
        "step ratios without the optimizer step and the gradient all-reduce": {
            f"{name} step": rest[1][name] / rest[0][name] for name in rest[0]},
        "step ratios without the optimizer step, the gradient all-reduce and the all-to-alls": {
            f"{name} step": computation[1][name] / computation[0][name]
            for name in computation[0]},
        f"CP=1, {cp} at once": busy,
        f"step ratio floors (CP=1 {cp} at once / {cp} / CP=1 alone)": {
            name: busy[name] / cp / base[name]
            for name in ("full-sequence step", "local-opt expected step")},
        "targets": {name: {"ratio": ratios[name], "target": target,
                           "met": ratios[name] <= target} for name, target in TARGETS.items()},
    }


def format_table(result: dict) -> str:
    cp = result["context parallel size"]
    columns = ["row", "CP=1 median step (ms)", f"CP=1, {cp} at once median step (ms)",
               f"CP={cp} median step (ms)", "step ratio",
               f"CP={cp} all-to-alls per step", f"CP={cp} all-to-alls alone (ms)",
               "CP=1 peak (MB)", f"CP={cp} peak per rank (MB)", "memory ratio"]
    lines = [f"preset {result['preset']}: {result['layout']}, micro-batch "
             f"{result['micro batch']}, ZeRO-{result['ZeRO stage']} (reduce bucket "
             f"{result['reduce bucket size'] or 'default'}), model "
             f"{result['model']}, median of "
             f"{result['repeats']} steps per row after {result['warmup']} warm-up; "
             f"{result['device']}; memory: {result['memory measure']}",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in result["rows"]:
        lines.append("| " + " | ".join(row[c] if isinstance(row[c], str) else f"{row[c]:.3g}"
                                       for c in columns) + " |")
    for name, check in result["targets"].items():
        lines.append(f"CP={cp} / CP=1 {name}: {check['ratio']:.3f} <= {check['target']} "
                     f"({'met' if check['met'] else 'MISSED'})")
    lines.append(f"not split by CP: the optimizer step (CP=1 / CP={cp} median, full-sequence "
                 f"{1e3 * result['CP=1']['full-sequence optimizer step']:.0f} / "
                 f"{1e3 * result[f'CP={cp}']['full-sequence optimizer step']:.0f} ms) and the "
                 f"gradient all-reduce at CP={cp} "
                 f"({1e3 * result[f'CP={cp} gradient all-reduce (s)']:.0f} ms, timed alone); "
                 f"step ratios without them (informational, not the targets): " + ", ".join(
                     f"{name} {ratio:.3f}" for name, ratio in result[
                         "step ratios without the optimizer step and the gradient all-reduce"
                     ].items()))
    lines.append(f"added by CP: the all-to-alls (CP={cp}, replayed alone; full-sequence "
                 f"{1e3 * result[f'CP={cp}']['full-sequence all-to-alls']:.0f} ms, Local Opt. "
                 f"expected {1e3 * result[f'CP={cp}']['local-opt expected all-to-alls']:.0f} ms); "
                 f"step ratios without them too, the computation (informational): " + ", ".join(
                     f"{name} {ratio:.3f}" for name, ratio in result[
                         "step ratios without the optimizer step, the gradient all-reduce and "
                         "the all-to-alls"].items()))
    floors = result[f"step ratio floors (CP=1 {cp} at once / {cp} / CP=1 alone)"]
    lines.append(f"this machine's floor: CP=1 run {cp} times at once (no communication, each rank "
                 f"under the load of CP={cp}), its step / {cp} against CP=1 alone: " + ", ".join(
                     f"{name} {ratio:.3f}" for name, ratio in floors.items()))
    return "\n".join(lines)
