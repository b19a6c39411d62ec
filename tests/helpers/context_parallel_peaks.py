"""Per-rank step peaks under context parallelism, for the planner's test (under torchrun).

The real trainer step (a DeepSpeed engine with Megatron's groups, ZeRO-0) measured as
``localopt-bench speed`` measures it, for full-sequence and Local Opt.'s first and last windows
of the planner's rows; per row the largest rank's peak, the smallest of 3 profiled steps (as the
bench takes it: under gloo each step's figure is an upper bound, some of the collectives' buffers
being freed unrecorded on gloo's thread). Rank 0 writes OUT.json: {row: MiB}.

Usage: context_parallel_peaks.py OUT.json PRESET MODEL_FLAGS VOCAB FRAMES FRAME_TOKENS BATCH
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from localopt_plugin.bench.planner import Setup, objectives
from localopt_plugin.bench.speed import _engine, _step, peak_allocated_bytes
from localopt_plugin.model import ParallelConfig, padded_vocab_size
from localopt_plugin.model.presets import config_with_flags
from localopt_plugin.training.distributed import init_distributed


def main(out: str, preset: str, flags: str, vocab: str, frames: str, frame_tokens: str,
         batch: str) -> None:
    cp = int(os.environ["WORLD_SIZE"])  # every rank splits the sample
    init_distributed(ParallelConfig(context_parallel_size=cp, cp_comm_type=("a2a",)), seed=1234)
    model = config_with_flags(preset, flags)
    setup = Setup(model=model, vocab=padded_vocab_size(int(vocab),
                                                       model.make_vocab_size_divisible_by, 1),
                  frames=int(frames), frame_tokens=int(frame_tokens), window=2, stride=1,
                  first_prob=0.5, micro_batch=int(batch), context_parallel=cp)
    model = dataclasses.replace(model, max_position_embeddings=setup.layout.input_length)
    engine = _engine(model, setup.vocab, 1234,
                     parallel=ParallelConfig(context_parallel_size=cp, cp_comm_type=("a2a",)))
    _, _, named = objectives(setup)
    tokens = torch.randint(0, setup.vocab, (setup.micro_batch, setup.layout.seq_length),
                           generator=torch.Generator().manual_seed(1234))
    peaks = {}
    for name, _, objective in (named[0], named[2], named[-1]):
        row = SimpleNamespace(engine=engine, objective=objective)
        for iteration in range(2):
            _step(row, tokens, iteration)
        peak = torch.tensor([min(peak_allocated_bytes(lambda r=row: _step(r, tokens, 0))
                                 for _ in range(3))], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        peaks[name] = float(peak) / 2**20
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(peaks, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
