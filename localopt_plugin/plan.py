"""The forward plan: the contract between objectives and every executor.

An objective turns a micro-batch into a :class:`ForwardPlan` (which tokens run as context
without autograd, which run with autograd at which absolute positions, which carry the loss);
executors run plans without knowing which objective made them: :func:`run_plan` on a whole
GPTModel (the DeepSpeed trainer, Megatron-LM's forward step, benchmarks), the DeepSpeed pipeline
stages (``localopt_plugin.training.pipeline``) stage by stage. :class:`ObjectiveOutput` is what
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


@dataclass
class ForwardPlan:
    """One micro-batch's forward.

    context_ids: ``[b, c]`` tokens at positions ``[0, c)`` run under ``no_grad``, or None; the
        keys/values of positions ``>= context_keep_from`` are kept for the autograd pass.
    ids / positions: ``[b, s]`` tokens run with autograd at absolute ``positions`` ``[s]``.
    loss_from: outputs ``[loss_from:]`` are optimized against ``labels`` ``[b, s - loss_from]``.
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


@dataclass
class ObjectiveOutput:
    """loss: mean cross-entropy over the optimized video tokens.

    hidden: final hidden states ``[s, b, h]`` of the optimized positions (frames x tokens in
    raster order), which regularizers such as ReCo act on.
    pre_norm_hidden: the same positions' residual stream before the final norm (every executor
    provides it: ReCo's default ``pre-norm`` form acts on it).
    shard: under context (or sequence) parallelism, which rows of the optimized positions
    ``hidden`` holds on this rank; every regularizer's loss is then this rank's share of the
    whole value: the shares sum to it over the shard's group, as their gradients do.
    loss_shared: ``loss`` is such a share too (context parallelism: each rank computes the
    cross-entropy of its rows); False under sequence parallelism, where the output layer
    gathers the sequence and each tensor-parallel rank computes the whole.
    """

    loss: torch.Tensor
    hidden: torch.Tensor
    pre_norm_hidden: torch.Tensor
    num_tokens: int
    first_frame: int
    num_frames: int
    metrics: dict[str, float] = field(default_factory=dict)
    shard: SequenceShard | None = None
    loss_shared: bool = True

    def whole(self, share: torch.Tensor) -> torch.Tensor:
        """The detached whole value of a per-rank share of something computed on ``hidden``
        (a regularizer's): summed over the ranks ``hidden`` is split over."""
        return share.detach() if self.shard is None else self.shard.sum(share)

    def lm_loss(self) -> torch.Tensor:
        """The detached whole LM loss (``loss`` is a share under context parallelism; under
        sequence parallelism every tensor-parallel rank computes the whole)."""
        return self.whole(self.loss) if self.loss_shared else self.loss.detach()


def objective_output(losses: torch.Tensor, hidden: torch.Tensor, pre_norm_hidden: torch.Tensor,
                     first_frame: int, num_frames: int,
                     metrics: dict[str, float] | None = None,
                     shard: SequenceShard | None = None,
                     loss_shared: bool = True) -> ObjectiveOutput:
    """What a run of a plan yields, from its per-token losses ``[b, s]`` and the optimized
    positions' states: the one place every executor (whole model, DeepSpeed pipeline's last
    stage, Megatron-LM's loss function) assembles it. With ``shard`` (context parallelism),
    ``losses`` are this rank's rows and the loss is their share of the whole mean."""
    if shard is None or not loss_shared:
        loss, count = losses.float().mean(), losses.numel()
    else:
        count = losses.shape[0] * shard.total
        loss = losses.float().sum() / count
    return ObjectiveOutput(loss, hidden, pre_norm_hidden, count, first_frame, num_frames,
                           dict(metrics or {}), shard, loss_shared)


def plan_shards(model, plan: ForwardPlan) -> tuple[SequenceShard | None, SequenceShard | None]:
    """The context pass's and the autograd pass's slices on this rank (None, None without
    context parallelism)."""
    group = context_parallel_group(model)
    if group is None:
        return None, None
    if not (model.pre_process and model.post_process):
        raise NotImplementedError("context parallelism with pipeline parallelism is not "
                                  "implemented: use --pipeline-model-parallel-size 1")
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
    travel in it: the context pass's ``c`` rows first, then the autograd pass's ``s`` rows. A
    stage without the embedding reads them from ``model.decoder.input_tensor`` (``[c + s, b,
    h]``); a stage before the last returns them (un-normed, see :func:`forward_hidden`). The
    context rows are produced under ``no_grad``, so their gradient is zero: backward carries
    nothing into them, and the window's gradients are those of the whole-model run.
    """
    context = 0 if plan.context_ids is None else plan.context_ids.shape[1]
    context_shard, shard = plan_shards(model, plan)
    received = None if model.pre_process else model.decoder.input_tensor
    if received is not None and received.shape[0] != context + len(plan.positions):
        raise RuntimeError(f"a pipeline stage received {received.shape[0]} rows for a plan of "
                           f"{context} context and {len(plan.positions)} autograd rows")
    memory, context_out = None, None
    if context:
        memory = context_memory(model, plan.context_keep_from, context,
                                int(plan.positions[-1]) + 1)
        if received is not None:
            model.decoder.set_input_tensor(received[:context])
        with torch.no_grad():
            context_out = forward_hidden(
                model, plan.context_ids if model.pre_process else None,
                torch.arange(context, device=plan.ids.device), memory=memory,
                store_from=plan.context_keep_from, shard=context_shard)
    if received is not None:
        model.decoder.set_input_tensor(received[context:])
    hidden = forward_hidden(model, plan.ids if model.pre_process else None, plan.positions,
                            memory=memory, shard=shard)
    if received is not None:
        model.decoder.set_input_tensor(received)
    if model.post_process or context_out is None:
        return hidden
    return torch.cat([context_out, hidden])


def optimized_rows(plan: ForwardPlan, shard: SequenceShard | None, hidden: torch.Tensor,
                   pre_norm_hidden: torch.Tensor):
    """This rank's rows of the optimized positions ``[loss_from, s)`` of a plan's autograd
    pass: ``(hidden, pre_norm_hidden, labels, shard of those rows)`` (the shard is None without
    context parallelism)."""
    if shard is None:
        return (hidden[plan.loss_from:], pre_norm_hidden[plan.loss_from:], plan.labels, None)
    optimized = shard.between(plan.loss_from)
    skip = max(0, plan.loss_from - shard.start)
    return hidden[skip:], pre_norm_hidden[skip:], optimized.local(plan.labels, dim=1), optimized


def sequence_parallel_rows(model, plan: ForwardPlan, hidden: torch.Tensor,
                           pre_norm_hidden: torch.Tensor):
    """Under sequence parallelism ``hidden`` is this TP rank's even slice of the padded rows:
    ``(per-token losses [b, s - loss_from] from the output layer, which gathers the rows, so
    every TP rank has them all; this rank's optimized rows of hidden and pre_norm_hidden;
    their shard)``."""
    group = parallel_state.get_tensor_model_parallel_group()
    padded = SequenceShard(group, (hidden.shape[0],) * dist.get_world_size(group),
                           dist.get_rank(group))
    length = len(plan.positions)
    shard = padded.between(plan.loss_from, length)
    losses = model.compute_language_model_loss(
        plan.labels, compute_logits(model, hidden)[plan.loss_from:length])
    skip = max(0, plan.loss_from - padded.start)
    rows = slice(skip, skip + shard.sizes[shard.rank])
    return losses, hidden[rows], pre_norm_hidden[rows], shard


def run_plan(model, plan: ForwardPlan) -> ObjectiveOutput:
    """Execute a plan on a whole (non-pipelined) GPTModel."""
    with final_norm_input(model) as pre_norm:
        hidden = plan_hidden(model, plan)
    if model.config.sequence_parallel:
        losses, hidden, pre_norm_hidden, shard = sequence_parallel_rows(
            model, plan, hidden, pre_norm["hidden"])
        return objective_output(losses, hidden, pre_norm_hidden, plan.first_frame,
                                plan.num_frames, plan.metrics, shard, loss_shared=False)
    hidden, pre_norm_hidden, labels, shard = optimized_rows(
        plan, plan_shards(model, plan)[1], hidden, pre_norm["hidden"])
    return objective_output(token_losses(model, hidden, labels), hidden, pre_norm_hidden,
                            plan.first_frame, plan.num_frames, plan.metrics, shard)
