"""The forward plan: the contract between objectives and every executor.

An objective turns a micro-batch into a :class:`ForwardPlan` (which tokens run as context
without autograd, which run with autograd at which absolute positions, which carry the loss);
executors run plans without knowing which objective made them: :func:`run_plan` on a whole
GPTModel (the DeepSpeed trainer, benchmarks); :func:`plan_hidden` on each stage of a pipeline
(DeepSpeed's, ``localopt_plugin.training.pipeline``, and Megatron-LM's schedules), the last
stage finishing with :func:`plan_output`. :class:`ObjectiveOutput` is what
a run yields and what regularizers act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from localopt_plugin.model import (
    compute_logits,
    context_memory,
    final_norm_input,
    forward_hidden,
    token_losses,
)
from localopt_plugin.model.context_parallel import SequenceShard, context_parallel_group
from localopt_plugin.model.sequence_parallel import sequence_parallel_local_rows


@dataclass
class ForwardPlan:
    """One micro-batch's forward.

    context_ids: ``[b, c]`` tokens at positions ``[0, c)`` run under ``no_grad``, or None; the
        keys/values of positions ``>= context_keep_from`` are kept for the autograd pass.
    ids / positions: ``[b, s]`` tokens run with autograd at absolute ``positions`` ``[s]``.
    loss_from: outputs ``[loss_from:]`` are optimized against ``labels`` ``[b, s - loss_from]``.
    windows: several windows per context pass: ``(first position, length)`` of each window the
        autograd pass runs after its first ``loss_from`` tokens, each attending to the context
        before its own start and to itself only; empty: the autograd pass is one run.
        ``first_frame`` is then the first window's, ``num_frames`` the frames of each.
    """

    context_ids: torch.Tensor | None
    context_keep_from: int
    ids: torch.Tensor
    positions: torch.Tensor
    loss_from: int
    labels: torch.Tensor
    first_frame: int
    num_frames: int
    metrics: dict[str, float] = field(default_factory=dict)
    windows: tuple[tuple[int, int], ...] = ()

    @property
    def window_count(self) -> int:
        return max(1, len(self.windows))


@dataclass
class ObjectiveOutput:
    """loss: mean cross-entropy over the optimized video tokens.

    hidden: final hidden states ``[s, b, h]`` of the optimized positions (frames x tokens in
    raster order), which regularizers such as ReCo act on.
    pre_norm_hidden: the same positions' residual stream before the final norm (every executor
    provides it: ReCo's default ``pre-norm`` form acts on it).
    shard: under context or sequence parallelism, which rows of the optimized positions
    ``hidden`` holds on this rank; every regularizer's loss is then this rank's share of the
    whole value: the shares sum to it over the shard's group, as their gradients do.
    loss_shard: the rows whose cross-entropy ``loss`` is this rank's share of (context
    parallelism: each rank computes its rows'), or None when ``loss`` is whole (no context
    parallelism; under sequence parallelism the output layer gathers the tensor-parallel
    slices, so each tensor-parallel rank computes its context-parallel rank's share).
    windows: how many windows of ``num_frames`` frames ``hidden`` holds one after another
    (several windows per context pass): no pair of neighbours spans two of them.
    """

    loss: torch.Tensor
    hidden: torch.Tensor
    pre_norm_hidden: torch.Tensor
    num_tokens: int
    first_frame: int
    num_frames: int
    metrics: dict[str, float] = field(default_factory=dict)
    shard: SequenceShard | None = None
    loss_shard: SequenceShard | None = None
    windows: int = 1

    def whole(self, share: torch.Tensor) -> torch.Tensor:
        """The detached whole value of a per-rank share of something computed on ``hidden``
        (a regularizer's): summed over the ranks ``hidden`` is split over."""
        return share.detach() if self.shard is None else self.shard.sum(share)

    def lm_loss(self) -> torch.Tensor:
        """The detached whole LM loss."""
        return self.loss.detach() if self.loss_shard is None else self.loss_shard.sum(self.loss)


def objective_output(losses: torch.Tensor, hidden: torch.Tensor, pre_norm_hidden: torch.Tensor,
                     first_frame: int, num_frames: int,
                     metrics: dict[str, float] | None = None,
                     shard: SequenceShard | None = None,
                     loss_shard: SequenceShard | None = None,
                     windows: int = 1) -> ObjectiveOutput:
    """What a run of a plan yields, from its per-token losses ``[b, s]`` and the optimized
    positions' states: the one place every executor (whole model, DeepSpeed pipeline's last
    stage, Megatron-LM's loss function) assembles it. With ``loss_shard`` (context
    parallelism), ``losses`` are this rank's rows and the loss is their share of the whole
    mean."""
    if loss_shard is None:
        loss, count = losses.float().mean(), losses.numel()
    else:
        count = losses.shape[0] * loss_shard.total
        loss = losses.float().sum() / count
    return ObjectiveOutput(loss, hidden, pre_norm_hidden, count, first_frame, num_frames,
                           dict(metrics or {}), shard, loss_shard, windows)


def plan_shards(model, plan: ForwardPlan) -> tuple[SequenceShard | None, SequenceShard | None]:
    """The context pass's and the autograd pass's slices on this rank (None, None without
    context parallelism)."""
    group = context_parallel_group(model)
    if group is None:
        return None, None
    context = 0 if plan.context_ids is None else plan.context_ids.shape[1]
    shards = [SequenceShard.split(length, group) if length else None
              for length in (context, len(plan.positions))]
    for shard in shards:
        if shard is not None and min(shard.sizes) == 0:
            raise ValueError(f"{shard.total} tokens do not give each of {shard.world} "
                             f"context-parallel ranks one")
    return shards[0], shards[1]


def plan_hidden(model, plan: ForwardPlan) -> torch.Tensor:
    """The context pass (``no_grad``, keeping keys/values) then the autograd pass of a plan;
    returns the autograd pass's hidden states ``[s, b, h]`` (this rank's rows of them under
    context parallelism: see :func:`plan_shards`).

    On a stage of Megatron's pipeline schedule, where one tensor crosses stages, both streams
    travel in it: the context pass's ``c`` rows first, then the autograd pass's ``s`` rows
    (this rank's slices of each under context or sequence parallelism). A stage without the
    embedding reads them from ``model.decoder.input_tensor`` (``[c + s, b, h]``); a stage
    before the last returns them (un-normed, see :func:`forward_hidden`). The
    context rows are produced under ``no_grad``, so their gradient is zero: backward carries
    nothing into them, and the window's gradients are those of the whole-model run.
    """
    context = 0 if plan.context_ids is None else plan.context_ids.shape[1]
    context_shard, shard = plan_shards(model, plan)
    received = None if model.pre_process else model.decoder.input_tensor
    # this rank's rows of each stream: its context-parallel slice, or its sequence-parallel
    # slice of the padded rows (what crosses pipeline stages)
    context_rows, rows = (
        sequence_parallel_local_rows(model, length if part is None else part.sizes[part.rank])
        for part, length in ((context_shard, context), (shard, len(plan.positions))))
    if received is not None and received.shape[0] != context_rows + rows:
        raise RuntimeError(f"a pipeline stage received {received.shape[0]} rows for a plan of "
                           f"{context_rows} context and {rows} autograd rows on this rank")
    memory, context_out = None, None
    if context:
        memory = context_memory(model, plan.context_keep_from, context,
                                int(plan.positions.max()) + 1)
        if received is not None:
            model.decoder.set_input_tensor(received[:context_rows])
        with torch.no_grad():
            context_out = forward_hidden(
                model, plan.context_ids if model.pre_process else None,
                torch.arange(context, device=plan.ids.device), memory=memory,
                store_from=plan.context_keep_from, shard=context_shard)
    if received is not None:
        model.decoder.set_input_tensor(received[context_rows:])
    hidden = forward_hidden(model, plan.ids if model.pre_process else None, plan.positions,
                            memory=memory, shard=shard, windows=plan.windows)
    if received is not None:
        model.decoder.set_input_tensor(received)
    if model.post_process or context_out is None:
        return hidden
    return torch.cat([context_out, hidden])


def optimized_outputs(model, plan: ForwardPlan, hidden: torch.Tensor,
                      pre_norm_hidden: torch.Tensor):
    """This rank's part of what a plan's autograd pass optimizes, from its hidden states and
    residual stream (:func:`plan_hidden`, on the last pipeline stage): ``(per-token losses,
    hidden, pre_norm_hidden, shard, loss_shard)`` in :class:`ObjectiveOutput`'s terms."""
    shard = plan_shards(model, plan)[1]
    if model.config.sequence_parallel:
        return _sequence_parallel_outputs(model, plan, shard, hidden, pre_norm_hidden)
    if shard is None:
        hidden, pre_norm_hidden = hidden[plan.loss_from:], pre_norm_hidden[plan.loss_from:]
        return token_losses(model, hidden, plan.labels), hidden, pre_norm_hidden, None, None
    optimized = shard.between(plan.loss_from)
    skip = max(0, plan.loss_from - shard.start)
    hidden, pre_norm_hidden = hidden[skip:], pre_norm_hidden[skip:]
    losses = token_losses(model, hidden, optimized.local(plan.labels, dim=1))
    return losses, hidden, pre_norm_hidden, optimized, optimized


def _sequence_parallel_outputs(model, plan: ForwardPlan, shard: SequenceShard | None,
                               hidden: torch.Tensor, pre_norm_hidden: torch.Tensor):
    """:func:`optimized_outputs` under sequence parallelism: ``hidden`` is this TP rank's even
    slice of the padded rows (of this context-parallel rank's ``shard`` of them under both).
    The output layer gathers the slices, so every TP rank has the losses of its CP rank's
    rows; the states' shard runs over the tensor x context ranks (CP-major, as Megatron
    orders that group), each rank's real optimized rows of its slice."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    length = len(plan.positions)
    if shard is None:
        group, starts, counts, cp_rank = tp_group, (0,), (length,), 0
    else:
        group = parallel_state.get_tensor_and_context_parallel_group()
        starts = tuple(shard.bounds(r)[0] for r in range(shard.world))
        counts, cp_rank = shard.sizes, shard.rank
    rank = cp_rank * tp + tp_rank
    if dist.get_rank(group) != rank:
        raise RuntimeError(f"the tensor x context group ranks this rank {dist.get_rank(group)}, "
                           f"not {rank} (context-parallel rank x TP size + TP rank)")
    sizes = []
    for start, count in zip(starts, counts, strict=True):
        per = sequence_parallel_local_rows(model, count)  # padded rows per TP rank
        for part in range(tp):
            lo, hi = start + part * per, start + min((part + 1) * per, count)
            sizes.append(max(0, min(hi, length) - max(lo, plan.loss_from)))
    states = SequenceShard(group, tuple(sizes), rank)
    first = max(0, plan.loss_from - starts[cp_rank])  # this CP rank's first optimized row
    labels, loss_shard = plan.labels, None
    if shard is not None:
        loss_shard = shard.between(plan.loss_from)
        labels = loss_shard.local(labels, dim=1)
    logits = compute_logits(model, hidden)[first:counts[cp_rank]]
    losses = model.compute_language_model_loss(labels, logits)
    skip = max(0, plan.loss_from - (starts[cp_rank] + tp_rank * hidden.shape[0]))
    rows = slice(skip, skip + sizes[rank])
    return losses, hidden[rows], pre_norm_hidden[rows], states, loss_shard


def plan_output(model, plan: ForwardPlan, hidden: torch.Tensor,
                pre_norm_hidden: torch.Tensor) -> ObjectiveOutput:
    """What a plan yields on the last stage (or a whole model), from the hidden states and
    residual stream of :func:`plan_hidden`: the loss assembly of the whole-model run and of
    DeepSpeed's pipeline (Megatron-LM's schedule splits it: :func:`optimized_outputs` in the
    forward step, :func:`objective_output` in its loss function)."""
    losses, hidden, pre_norm_hidden, shard, loss_shard = optimized_outputs(
        model, plan, hidden, pre_norm_hidden)
    return objective_output(losses, hidden, pre_norm_hidden, plan.first_frame, plan.num_frames,
                            plan.metrics, shard, loss_shard, plan.window_count)


def run_plan(model, plan: ForwardPlan) -> ObjectiveOutput:
    """Execute a plan on a whole (non-pipelined) GPTModel."""
    with final_norm_input(model) as pre_norm:
        hidden = plan_hidden(model, plan)
    return plan_output(model, plan, hidden, pre_norm["hidden"])
