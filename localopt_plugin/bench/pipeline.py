"""``localopt-bench pipeline``: what Local Opt.'s context rows cost under Megatron's pipeline
schedule, per stage, against full-sequence in the same run.

Under Megatron-LM's pipeline schedule both of Local Opt.'s streams cross stages in one tensor:
the context rows (computed under ``no_grad``) before the window rows. Two ranks run Megatron-
Core's 1F1B schedule (PP=2) with :class:`~localopt_plugin.megatron_lm.LocalOptForwardStep` for
every candidate window and for full-sequence, and count per micro-batch:

* **activation traffic**: the bytes stage 0 sends forward and stage 1 sends back (gradients),
  read off every point-to-point send (the shape messages of variable sequence lengths apart);
* **activation memory**: the bytes each stage keeps for backward (tensors saved by autograd,
  each storage once, plus the received input tensor Megatron keeps), and the kept context
  keys/values among them.

Counts, not timings: they do not depend on the machine. The expectation over the window draws
(``--first-window-prob``) and the worst window are reported with their ratio to full-sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

MIB = 2**20


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=5, help="latent frames per sample")
    parser.add_argument("--frame-tokens", type=int, default=256)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--first-window-prob", type=float, default=0.5)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--preset", default="bench", help="model preset (4 layers, 2 a stage)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


class Counter:
    """Bytes sent point-to-point (Megatron's batched p2p) and bytes saved for backward."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.sent = 0
        self.saved: dict[int, int] = {}  # storage -> bytes
        batch = dist.batch_isend_irecv

        def counting_batch(ops):
            for op in ops:
                if op.op is dist.isend and op.tensor.is_floating_point():  # not a shape
                    self.sent += op.tensor.numel() * op.tensor.element_size()
            return batch(ops)

        dist.batch_isend_irecv = counting_batch

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        self.saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def reset(self) -> None:
        self.sent, self.saved = 0, {}


def _worker(args: argparse.Namespace) -> None:
    """One rank of the PP=2 run: the counts of every variant, written as JSON by each rank."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from localopt_plugin.megatron_lm import (
        LocalOptForwardStep,
        build_datasets,
        build_model,
        video_source,
    )
    from localopt_plugin.model import ModelConfig, ParallelConfig, transformer_config
    from localopt_plugin.model.kv_memory import KVMemory
    from localopt_plugin.model.presets import apply_preset
    from localopt_plugin.objectives import LocalOptimization
    from localopt_plugin.training.distributed import init_distributed
    from localopt_plugin.training.parser import build_parser

    init_distributed(ParallelConfig(pipeline_model_parallel_size=2), seed=1234)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    counter = Counter()
    kept: list[int] = []
    store = KVMemory.store

    def counting_store(memory, layer, key, value, position):
        store(memory, layer, key, value, position)
        kept.append(memory.num_bytes())

    KVMemory.store = counting_store
    results = {}
    starts = list(range(args.frames - args.window + 1))
    for variant in ["full-sequence", *(f"window {s}" for s in starts)]:
        objective = "full-sequence" if variant == "full-sequence" else "local-opt"
        flags = ["--preset", args.preset, "--objective", objective,
                 "--synthetic-frames", str(args.frames), "--synthetic-frame-tokens",
                 str(args.frame_tokens), "--local-opt-window-frames", str(args.window),
                 "--pipeline-model-parallel-size", "2", "--micro-batch-size",
                 str(args.micro_batch_size), "--hidden-dropout", "0", "--attention-dropout",
                 "0"]
        parser = build_parser()
        apply_preset(parser, flags)
        run_args = parser.parse_args(flags)
        step = LocalOptForwardStep(run_args)
        step._setup()
        layout = step._layout
        run_args.seq_length = run_args.max_position_embeddings = layout.input_length
        if objective == "local-opt":
            start = int(variant.split()[1])
            step._objective = LocalOptimization(layout, _Fixed(start, args.window))
        config = transformer_config(ModelConfig.from_args(run_args),
                                    ParallelConfig.from_args(run_args))
        model = build_model(run_args, config, video_source(run_args).vocab.size,
                            pre_process=stage == 0, post_process=stage == 1)
        model.config.variable_seq_lengths = True  # as model_provider sets it under PP
        stream = build_datasets(run_args)[0]
        counter.reset()
        kept.clear()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            get_forward_backward_func()(
                forward_step_func=step, data_iterator=stream, model=[model], num_microbatches=1,
                seq_length=layout.input_length, micro_batch_size=args.micro_batch_size,
                forward_only=False)
        if stage == 0 and not counter.sent:
            raise RuntimeError("no activation was counted: Megatron's p2p did not batch")
        # what the schedule keeps from forward to backward besides autograd's saved tensors:
        # stage 0 its output (the sent tensor), stage 1 its received input
        received = model.decoder.input_tensor
        held = counter.sent if stage == 0 else received.numel() * received.element_size()
        results[variant] = {"sent": counter.sent, "saved": sum(counter.saved.values()),
                            "held": held, "kept context": max(kept, default=0)}
    with open(os.path.join(args.worker, f"stage{stage}.json"), "w") as f:
        json.dump(results, f)


class _Fixed:
    """A window sampler that always draws ``start``."""

    def __init__(self, start: int, window: int) -> None:
        self.start, self.window_frames = start, window

    def draw(self, iteration: int, micro_batch: int) -> int:
        return self.start


def run(args: argparse.Namespace) -> dict:
    from localopt_plugin.objectives import WindowSampler

    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "localopt_plugin.bench.pipeline", "--worker", out,
               "--frames", str(args.frames), "--frame-tokens", str(args.frame_tokens),
               "--window", str(args.window), "--micro-batch-size", str(args.micro_batch_size),
               "--preset", args.preset]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"the PP=2 run failed:\n{proc.stderr[-4000:]}")
        stages = []
        for s in (0, 1):
            with open(os.path.join(out, f"stage{s}.json")) as f:
                stages.append(json.load(f))
    sampler = WindowSampler(args.frames, args.window, 1, 0, first_prob=args.first_window_prob)
    probability = dict(zip(sampler.starts, sampler.probabilities(), strict=True))
    rows = []
    for variant in stages[0]:
        rows.append({
            "variant": variant,
            "forward MiB (stage 0 -> 1)": stages[0][variant]["sent"] / MIB,
            "gradient MiB (stage 1 -> 0)": stages[1][variant]["sent"] / MIB,
            **{f"stage {s} kept for backward MiB": (stages[s][variant]["saved"]
                                                    + stages[s][variant]["held"]) / MIB
               for s in (0, 1)},
            "kept context K/V MiB (per stage)":
                stages[0][variant]["kept context"] / MIB,
        })
    full = rows[0]
    windows = rows[1:]
    keys = [k for k in full if k != "variant"]
    expected = {k: sum(probability[int(r["variant"].split()[1])] * r[k] for r in windows)
                for k in keys}
    worst = {k: max(r[k] for r in windows) for k in keys}
    summary = [{"variant": "local-opt, expected over draws", **expected},
               {"variant": "local-opt, worst window", **worst}]
    ratios = {name: {k: (row[k] / full[k] if full[k] else None) for k in keys}
              for name, row in (("expected", expected), ("worst", worst))}
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "json", "command")}
    return {"settings": settings, "rows": rows + summary,
            "ratio to full-sequence": ratios}


def main(args: argparse.Namespace) -> int:
    if args.worker:
        _worker(args)
        return 0
    result = run(args)
    keys = list(result["rows"][0])
    print(" | ".join(keys))
    for row in result["rows"]:
        print(" | ".join(f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k])
                         for k in keys))
    for name, ratio in result["ratio to full-sequence"].items():
        print(f"ratio to full-sequence ({name}): "
              + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items() if v is not None))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    from localopt_plugin.platform import configure_environment

    configure_environment()
    parser = argparse.ArgumentParser()
    add_args(parser)
    sys.exit(main(parser.parse_args()))
