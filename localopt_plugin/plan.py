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

from localopt_plugin.model import (
    context_memory,
    final_norm_input,
    forward_hidden,
    token_losses,
)


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
    pre_norm_hidden: the same positions' residual stream before the final norm, where the
    executor can provide it (None on the DeepSpeed pipeline's last stage).
    """

    loss: torch.Tensor
    hidden: torch.Tensor
    num_tokens: int
    first_frame: int
    num_frames: int
    metrics: dict[str, float] = field(default_factory=dict)
    pre_norm_hidden: torch.Tensor | None = None


def plan_hidden(model, plan: ForwardPlan) -> torch.Tensor:
    """The context pass (``no_grad``, keeping keys/values) then the autograd pass of a plan;
    returns the autograd pass's hidden states ``[s, b, h]`` (un-normed on a non-last
    Megatron pipeline stage, see :func:`forward_hidden`)."""
    memory = None
    if plan.context_ids is not None:
        length = plan.context_ids.shape[1]
        memory = context_memory(model, plan.context_keep_from, length,
                                int(plan.positions[-1]) + 1)
        with torch.no_grad():
            forward_hidden(model, plan.context_ids,
                           torch.arange(length, device=plan.ids.device), memory=memory,
                           store_from=plan.context_keep_from)
    return forward_hidden(model, plan.ids, plan.positions, memory=memory)


def run_plan(model, plan: ForwardPlan) -> ObjectiveOutput:
    """Execute a plan on a whole (non-pipelined) GPTModel."""
    with final_norm_input(model) as pre_norm:
        hidden = plan_hidden(model, plan)[plan.loss_from:]
    loss = token_losses(model, hidden, plan.labels).float().mean()
    return ObjectiveOutput(loss, hidden, plan.labels.numel(), plan.first_frame,
                           plan.num_frames, plan.metrics,
                           pre_norm_hidden=pre_norm["hidden"][plan.loss_from:])
