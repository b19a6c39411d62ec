"""Full-sequence, Local Optimization and fewer-frames objectives over a video-token batch."""

from __future__ import annotations

import argparse

import torch

from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.model import KVMemory, forward_hidden, token_losses
from localopt_plugin.objectives.base import ObjectiveOutput
from localopt_plugin.objectives.window_sampler import WindowSampler
from localopt_plugin.registry import register


def _loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return token_losses(model, hidden, labels).float().mean()


class FullSequence:
    """Next-token cross-entropy on every video token of the sample."""

    def __init__(self, layout: SampleLayout, sampler: WindowSampler | None = None) -> None:
        self.layout = layout

    def __call__(self, model, tokens: torch.Tensor, iteration: int = 0,
                 micro_batch: int = 0) -> ObjectiveOutput:
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        start, end = self.layout.label_span(0, self.layout.num_frames)
        positions = torch.arange(end, device=tokens.device)
        hidden = forward_hidden(model, inputs[:, :end], positions)[start:end]
        loss = _loss(model, hidden, labels[:, start:end])
        return ObjectiveOutput(loss, hidden, labels[:, start:end].numel(), 0,
                               self.layout.num_frames)


class LocalOptimization:
    """Loss on one window of W frames; earlier frames are context without autograd.

    Pass 1 (``no_grad``) runs the conditioning prefix and the context frames and keeps every
    layer's keys/values of the context frames. Pass 2 runs the prefix again (it is a handful
    of tokens, and the conditioning embeddings must receive gradients) together with the
    window, attending to the kept keys/values. Frames after the window are never computed.
    """

    def __init__(self, layout: SampleLayout, sampler: WindowSampler) -> None:
        self.layout, self.sampler = layout, sampler

    def __call__(self, model, tokens: torch.Tensor, iteration: int = 0,
                 micro_batch: int = 0) -> ObjectiveOutput:
        first = self.sampler.draw(iteration, micro_batch)
        frames = self.sampler.window_frames
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        prefix = self.layout.prefix_length
        start, end = self.layout.label_span(first, frames)
        device = tokens.device
        memory = None
        if start > prefix:  # there are context frames
            memory = KVMemory()
            with torch.no_grad():
                forward_hidden(model, inputs[:, :start], torch.arange(start, device=device),
                               memory=memory, store=slice(prefix, start))
        ids = torch.cat([inputs[:, :prefix], inputs[:, start:end]], dim=1)
        positions = torch.cat([torch.arange(prefix, device=device),
                               torch.arange(start, end, device=device)])
        hidden = forward_hidden(model, ids, positions, memory=memory)[prefix:]
        loss = _loss(model, hidden, labels[:, start:end])
        return ObjectiveOutput(loss, hidden, labels[:, start:end].numel(), first, frames,
                               {"window start": float(first)})


class FewerFrames:
    """The naive baseline: a W-frame clip treated as a whole video (no earlier context)."""

    def __init__(self, layout: SampleLayout, sampler: WindowSampler) -> None:
        self.layout, self.sampler = layout, sampler

    def __call__(self, model, tokens: torch.Tensor, iteration: int = 0,
                 micro_batch: int = 0) -> ObjectiveOutput:
        first = self.sampler.draw(iteration, micro_batch)
        frames = self.sampler.window_frames
        v, p = self.layout.video_start, self.layout.frame_tokens
        clip = torch.cat([tokens[:, :v], tokens[:, v + first * p: v + (first + frames) * p]], 1)
        inputs, labels = clip[:, :-1], clip[:, 1:]
        start = self.layout.prefix_length
        positions = torch.arange(inputs.shape[1], device=tokens.device)
        hidden = forward_hidden(model, inputs, positions)[start:]
        loss = _loss(model, hidden, labels[:, start:])
        return ObjectiveOutput(loss, hidden, labels[:, start:].numel(), first, frames,
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
