"""Full-sequence, Local Optimization and fewer-frames objectives over a video-token batch.

Each objective turns a batch into a :class:`ForwardPlan`: which tokens run as context without
autograd, which run with autograd at which absolute positions, and which of those carry the
loss. :func:`run_plan` executes a plan on a whole model; the pipeline-parallel module
(``localopt_plugin.model.pipeline``) executes the same plans stage by stage.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.model import KVMemory, forward_hidden, token_losses
from localopt_plugin.objectives.base import ObjectiveOutput
from localopt_plugin.objectives.window_sampler import WindowSampler
from localopt_plugin.registry import register


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


def plan_hidden(model, plan: ForwardPlan) -> torch.Tensor:
    """The context pass (``no_grad``, keeping keys/values) then the autograd pass of a plan;
    returns the autograd pass's hidden states ``[s, b, h]`` (un-normed on a non-last
    Megatron pipeline stage, see :func:`forward_hidden`)."""
    memory = None
    if plan.context_ids is not None:
        memory = KVMemory()
        context_positions = torch.arange(plan.context_ids.shape[1], device=plan.ids.device)
        with torch.no_grad():
            forward_hidden(model, plan.context_ids, context_positions, memory=memory,
                           store=slice(plan.context_keep_from, None))
    return forward_hidden(model, plan.ids, plan.positions, memory=memory)


def run_plan(model, plan: ForwardPlan) -> ObjectiveOutput:
    """Execute a plan on a whole (non-pipelined) GPTModel."""
    hidden = plan_hidden(model, plan)[plan.loss_from:]
    loss = token_losses(model, hidden, plan.labels).float().mean()
    return ObjectiveOutput(loss, hidden, plan.labels.numel(), plan.first_frame,
                           plan.num_frames, plan.metrics)


class _Objective:
    def __init__(self, layout: SampleLayout, sampler: WindowSampler | None = None) -> None:
        self.layout, self.sampler = layout, sampler

    def __call__(self, model, tokens: torch.Tensor, iteration: int = 0,
                 micro_batch: int = 0) -> ObjectiveOutput:
        return run_plan(model, self.plan(tokens, iteration, micro_batch))

    def plan(self, tokens: torch.Tensor, iteration: int, micro_batch: int) -> ForwardPlan:
        raise NotImplementedError


class FullSequence(_Objective):
    """Next-token cross-entropy on every video token of the sample."""

    def plan(self, tokens: torch.Tensor, iteration: int = 0, micro_batch: int = 0) -> ForwardPlan:
        start, end = self.layout.label_span(0, self.layout.num_frames)
        return ForwardPlan(None, 0, tokens[:, :end], torch.arange(end, device=tokens.device),
                           start, tokens[:, start + 1:end + 1], 0, self.layout.num_frames)


class LocalOptimization(_Objective):
    """Loss on one window of W frames; earlier frames are context without autograd.

    The context pass (``no_grad``) runs the conditioning prefix and the context frames and
    keeps every layer's keys/values of the context frames. The autograd pass runs the prefix
    again (a handful of tokens whose embeddings must receive gradients) together with the
    window, attending to the kept keys/values. Frames after the window are never computed.
    """

    def plan(self, tokens: torch.Tensor, iteration: int = 0, micro_batch: int = 0) -> ForwardPlan:
        first = self.sampler.draw(iteration, micro_batch)
        frames = self.sampler.window_frames
        prefix = self.layout.prefix_length
        start, end = self.layout.label_span(first, frames)
        device = tokens.device
        context = tokens[:, :start] if start > prefix else None
        ids = torch.cat([tokens[:, :prefix], tokens[:, start:end]], dim=1)
        positions = torch.cat([torch.arange(prefix, device=device),
                               torch.arange(start, end, device=device)])
        return ForwardPlan(context, prefix, ids, positions, prefix,
                           tokens[:, start + 1:end + 1], first, frames,
                           {"window start": float(first)})


class FewerFrames(_Objective):
    """The naive baseline: a W-frame clip treated as a whole video (no earlier context)."""

    def plan(self, tokens: torch.Tensor, iteration: int = 0, micro_batch: int = 0) -> ForwardPlan:
        first = self.sampler.draw(iteration, micro_batch)
        frames = self.sampler.window_frames
        v, p = self.layout.video_start, self.layout.frame_tokens
        clip = torch.cat([tokens[:, :v], tokens[:, v + first * p: v + (first + frames) * p]], 1)
        prefix = self.layout.prefix_length
        length = clip.shape[1] - 1
        return ForwardPlan(None, 0, clip[:, :-1], torch.arange(length, device=tokens.device),
                           prefix, clip[:, prefix + 1:], first, frames,
                           {"clip start": float(first)})


register("objective", "full-sequence")(FullSequence)
register("objective", "local-opt")(LocalOptimization)
register("objective", "fewer-frames")(FewerFrames)


def build_objective(args: argparse.Namespace, layout: SampleLayout):
    """The objective named by ``--objective`` with the sampler named by ``--window-sampler``."""
    from localopt_plugin import registry

    sampler = None
    if args.objective != "full-sequence":
        try:
            sampler = registry.build("window_sampler", args.window_sampler, args=args,
                                     num_frames=layout.num_frames)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    return registry.get("objective", args.objective)(layout, sampler)
