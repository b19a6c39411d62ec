"""One rank of a context-parallel run against one process, in the same job (under torchrun).

Every rank builds two GPTModels with the same layout-independent weights: a reference with
context-parallel size 1 (each rank runs the whole sample alone, the single-process path) and
one split over all ranks (head-sharded attention). For full-sequence, fewer-frames and Local
Opt. + ReCo at the first, a middle and the last window, both run the same plan; the sharded
run's loss shares and gradients summed over the ranks must equal the reference's. Rank 0 writes
OUT.json: per case, the largest relative difference of the loss and of any gradient.

Usage: context_parallel_worker.py OUT.json QUERY_GROUPS... Also records a negative control
(ReCo without its halo exchange: the pairs straddling two ranks are lost) and, per Local Opt.
window, every collective's bytes by phase (a wrapper around torch.distributed) and the bytes
of the kept context's buffers on this rank and in the reference.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from types import SimpleNamespace
from unittest import mock

import torch
import torch.distributed as dist
from megatron.core import parallel_state

import localopt_plugin.plan as plan_module
from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.model import ParallelConfig, build_gpt_model
from localopt_plugin.model.presets import preset_config
from localopt_plugin.objectives.sequence import FewerFrames, FullSequence, LocalOptimization
from localopt_plugin.regularizers import apply_regularizers
from localopt_plugin.regularizers.reco import ReCo, ReCoConfig
from localopt_plugin.training.distributed import init_distributed

LAYOUT = SampleLayout(video_start=3, num_frames=5, frame_tokens=16)
VOCAB = 64
WINDOW = 2


def fixed_window(first: int):
    return SimpleNamespace(window_frames=WINDOW, draw=lambda iteration, micro_batch: first)


def cases():
    """(name, objective, regularizers)"""
    reco_token = ReCo(ReCoConfig(weight=0.1, pairs="adjacent-token", reduction="sum",
                                 states="pre-norm"))
    reco_frame = ReCo(ReCoConfig(weight=0.1, pairs="adjacent-frame", reduction="mean",
                                 states="final"))
    last = LAYOUT.num_frames - WINDOW
    yield "full-sequence", FullSequence(LAYOUT), []
    yield "full-sequence+reco", FullSequence(LAYOUT), [reco_token]
    yield "fewer-frames", FewerFrames(LAYOUT, fixed_window(1)), []
    for first in (0, 1, last):
        yield (f"local-opt+reco@{first}", LocalOptimization(LAYOUT, fixed_window(first)),
               [reco_token])
    yield "local-opt+reco-frame@1", LocalOptimization(LAYOUT, fixed_window(1)), [reco_frame]


def loss_and_grads(model, objective, regularizers, tokens):
    model.zero_grad(set_to_none=True)
    out = objective(model, tokens)
    total, metrics = apply_regularizers(out, regularizers, iteration=0)
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return float(metrics["total loss"]), grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def compare(reference, sharded, objective, regularizers, tokens, group) -> dict:
    want_loss, want = loss_and_grads(reference, objective, regularizers, tokens)
    got_loss, got = loss_and_grads(sharded, objective, regularizers, tokens)
    for grad in got.values():  # the context-parallel ranks hold shares of every gradient
        dist.all_reduce(grad, group=group)
    assert set(got) == set(want), set(got) ^ set(want)
    return {"loss": abs(got_loss - want_loss) / abs(want_loss),
            "grads": max(relative(got[n], want[n]) for n in want),
            "parameters": len(want)}


COLLECTIVES = ("all_to_all_single", "all_reduce", "all_gather", "all_gather_into_tensor",
               "reduce_scatter_tensor", "broadcast", "send", "recv", "isend", "irecv")


@contextlib.contextmanager
def collective_bytes():
    """Bytes each torch.distributed collective call hands over on this rank, keyed by the
    phase the caller sets in the returned dict's ``phase``: ``context`` (the context pass),
    ``window`` (the autograd pass's forward, ReCo) or ``backward``."""
    record = {"phase": None, "context": {}, "window": {}, "backward": {}}

    def wrap(name, real):
        def call(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            sent = tensors[1] if name == "all_to_all_single" else tensors[0]
            phase = record["phase"] or "window"
            record[phase][name] = record[phase].get(name, 0) + sent.nbytes
            return real(*args, **kwargs)
        return call

    originals = {name: getattr(dist, name) for name in COLLECTIVES}
    for name, real in originals.items():
        setattr(dist, name, wrap(name, real))
    try:
        yield record
    finally:
        for name, real in originals.items():
            setattr(dist, name, real)


def kept_context_bytes(model, objective, regularizers, tokens) -> tuple[int, dict]:
    """The kept context's buffer bytes on this rank and the collective bytes by phase of one
    step (forward, ReCo, backward)."""
    memories = []

    def capture(*args, **kwargs):
        memories.append(real(*args, **kwargs))
        return memories[-1]

    def tagged(*args, **kwargs):  # the context pass stores, the window pass does not
        record["phase"] = "context" if kwargs.get("store_from") is not None else "window"
        return real_forward(*args, **kwargs)

    real, real_forward = plan_module.context_memory, plan_module.forward_hidden
    with mock.patch.object(plan_module, "context_memory", capture), \
            mock.patch.object(plan_module, "forward_hidden", tagged), \
            collective_bytes() as record:
        out = objective(model, tokens)
        total, _ = apply_regularizers(out, regularizers, iteration=0)
        record["phase"] = "backward"
        total.backward()
    model.zero_grad(set_to_none=True)
    kept = sum(t.nbytes for memory in memories for pair in memory.layers.values()
               for t in pair)
    return kept, {k: v for k, v in record.items() if k != "phase"}


def main(out: str, *query_groups: str) -> None:
    init_distributed(ParallelConfig(context_parallel_size=int(os.environ["WORLD_SIZE"]),
                                    cp_comm_type=("a2a",)), seed=1234)
    cp = dist.get_world_size()
    group = parallel_state.get_context_parallel_group()
    results: dict[str, dict] = {}
    for groups in map(int, query_groups):
        config = preset_config("test", max_position_embeddings=256, num_query_groups=groups)
        reference = build_gpt_model(config, VOCAB, seed=7)
        sharded = build_gpt_model(
            config, VOCAB, seed=7,
            parallel=ParallelConfig(context_parallel_size=cp, cp_comm_type=("a2a",)))
        generator = torch.Generator().manual_seed(11)
        tokens = torch.randint(0, VOCAB, (2, LAYOUT.seq_length), generator=generator)
        for name, objective, regularizers in cases():
            results[f"{name} groups={groups}"] = compare(reference, sharded, objective,
                                                         regularizers, tokens, group)
        # negative control: ReCo with the pairs that straddle two ranks dropped
        import localopt_plugin.regularizers.reco as reco_module

        with mock.patch.object(reco_module, "rows_after",
                               lambda t, shard, count: t[:0]):
            name, objective, regularizers = next(c for c in cases()
                                                 if c[0] == "local-opt+reco@1")
            results[f"no-halo {name} groups={groups}"] = compare(
                reference, sharded, objective, regularizers, tokens, group)
        for first in (0, LAYOUT.num_frames - WINDOW):
            objective = LocalOptimization(LAYOUT, fixed_window(first))
            regularizers = [ReCo(ReCoConfig(weight=0.1, pairs="adjacent-token"))]
            kept, record = kept_context_bytes(sharded, objective, regularizers, tokens)
            reference_kept, _ = kept_context_bytes(reference, objective, regularizers, tokens)
            results[f"bytes@{first} groups={groups}"] = {
                "kept": kept, "reference kept": reference_kept, "collectives": record,
                "window tokens": WINDOW * LAYOUT.frame_tokens + LAYOUT.prefix_length,
                "batch": tokens.shape[0], "layers": config.num_layers,
                "heads": config.num_attention_heads, "groups": groups,
                "head_dim": config.hidden_size // config.num_attention_heads,
                "hidden": config.hidden_size}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"cp": cp, "results": results}, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
