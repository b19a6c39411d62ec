"""Full-sequence, Local Optimization and fewer-frames objectives over a video-token batch.

Each objective turns a batch into a :class:`~localopt_plugin.plan.ForwardPlan`: which tokens
run as context without autograd, which run with autograd at which absolute positions, and which
of those carry the loss. Executors (:func:`~localopt_plugin.plan.run_plan`, the DeepSpeed
pipeline stages, Megatron-LM's forward step) run the plans.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from localopt_plugin.config_flags import FlagConfig, option
from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.errors import UserError
from localopt_plugin.metric_names import (
    CLIP_START,
    FULL_SEQUENCE_STEP,
    LATEST_WINDOW_START,
    LM_LOSS,
    WINDOW_START,
)
from localopt_plugin.objectives.window_sampler import WindowSampler
from localopt_plugin.plan import ForwardPlan, ObjectiveOutput, run_plan
from localopt_plugin.registry import register


class Objective:
    """Base of the built-in objectives: ``plan`` per micro-batch; calling runs the plan.

    ``micro_batch`` is the global micro-batch index within the iteration (accumulation step x
    data-parallel size + data-parallel rank), which keys the window draw.
    """

    windowed = True  # draws windows: built with the run's window sampler

    @classmethod
    def build(cls, config: None, *, layout: SampleLayout,
              windows: Callable[[], WindowSampler]) -> Objective:
        """The registry's build function: ``windows()`` makes the run's window sampler (and
        validates the window flags against the layout), called only by windowed objectives."""
        return cls(layout, windows() if cls.windowed else None)

    def __init__(self, layout: SampleLayout, sampler: WindowSampler | None = None) -> None:
        self.layout, self.sampler = layout, sampler

    def __call__(self, model, tokens: torch.Tensor, iteration: int = 0,
                 micro_batch: int = 0) -> ObjectiveOutput:
        return run_plan(model, self.plan(tokens, iteration, micro_batch))

    def plan(self, tokens: torch.Tensor, iteration: int, micro_batch: int) -> ForwardPlan:
        raise NotImplementedError

    def observe(self, metrics: dict[str, float]) -> None:
        """A finished step's metrics, averaged over ranks (the same on every rank): its window
        and LM loss go to the window sampler (the adaptive one learns from them)."""
        if (self.sampler is not None and WINDOW_START in metrics
                and not metrics.get(FULL_SEQUENCE_STEP)):
            self.sampler.observe(int(round(metrics[WINDOW_START])), metrics[LM_LOSS])

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the objective (its window sampler's state)."""
        return {"window sampler": self.sampler.state_dict()} if self.sampler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.sampler is not None:
            self.sampler.load_state_dict(state.get("window sampler", {}))


class FullSequence(Objective):
    """Next-token cross-entropy on every video token of the sample."""

    windowed = False

    def plan(self, tokens: torch.Tensor, iteration: int = 0, micro_batch: int = 0) -> ForwardPlan:
        start, end = self.layout.label_span(0, self.layout.num_frames)
        return ForwardPlan(None, 0, tokens[:, :end], torch.arange(end, device=tokens.device),
                           start, tokens[:, start + 1:end + 1], 0, self.layout.num_frames)


@dataclass(frozen=True)
class LocalOptConfig(FlagConfig):
    """``--local-opt-full-sequence-share``: a share of steps trained on the whole sequence;
    ``--local-opt-windows-per-step``: several windows trained on one context pass."""

    PREFIX: ClassVar[str] = "--local-opt-"
    GROUP: ClassVar[str] = "localopt-plugin: local-opt objective (--objective local-opt)"

    full_sequence_share: float = option(0.0, "probability that a step trains on the whole "
                                        "sequence instead of a window (drawn per iteration "
                                        "from the seed)")
    windows_per_step: int = option(1, "K: windows drawn per micro-batch (independently, by "
                                   "the window sampler), trained on one context pass: the "
                                   "context up to the latest window runs once without autograd, "
                                   "each window attends to the context before its own start")

    def validate(self) -> None:
        if not 0.0 <= self.full_sequence_share <= 1.0:
            raise UserError(f"{self.flag('full_sequence_share')} must be in [0, 1], got "
                            f"{self.full_sequence_share}")
        if self.windows_per_step < 1:
            raise UserError(f"{self.flag('windows_per_step')} must be at least 1, got "
                            f"{self.windows_per_step}")


class LocalOptimization(Objective):
    """Loss on one window of W frames; earlier frames are context without autograd.

    The context pass (``no_grad``) runs the conditioning prefix and the context frames and
    keeps every layer's keys/values of the context frames. The autograd pass runs the prefix
    again (a handful of tokens whose embeddings must receive gradients) together with the
    window, attending to the kept keys/values. Frames after the window are never computed.
    With a full-sequence share ``q``, a step is instead a full-sequence step with probability
    ``q`` (one draw per iteration, shared by its micro-batches and ranks). With ``K`` windows
    per step, the context pass runs up to the latest of ``K`` independently drawn windows once,
    and the autograd pass runs the prefix with each window after it, each window attending
    to the context before its own start (never to another window): the gradient is the sum
    of the ``K`` windows' gradients (the loss their mean), at one context pass's cost.
    """

    @classmethod
    def build(cls, config: LocalOptConfig | None, *, layout: SampleLayout,
              windows: Callable[[], WindowSampler]) -> LocalOptimization:
        return cls(layout, windows(), config or LocalOptConfig())

    def __init__(self, layout: SampleLayout, sampler: WindowSampler | None = None,
                 config: LocalOptConfig | None = None) -> None:
        super().__init__(layout, sampler)
        config = config or LocalOptConfig()
        self.full_sequence_share = config.full_sequence_share
        self.windows_per_step = config.windows_per_step
        if self.windows_per_step > 1 and getattr(sampler, "learns_from_losses", False):
            raise UserError(f"{config.flag('windows_per_step')} {self.windows_per_step} with "
                            f"--window-sampler adaptive: the adaptive sampler learns from one "
                            f"window's loss per step; use one window per step or another "
                            f"sampler")

    def full_sequence_step(self, iteration: int) -> bool:
        """Whether ``iteration`` trains on the whole sequence (a pure function of the seed)."""
        if not self.full_sequence_share:
            return False
        return bool(np.random.default_rng([self.sampler.seed, 0xF0115E9, iteration]).random()
                    < self.full_sequence_share)

    def window_plan(self, tokens: torch.Tensor, first: int) -> ForwardPlan:
        """The plan of the window starting at latent frame ``first``."""
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
                           {WINDOW_START: float(first)})

    def windows_plan(self, tokens: torch.Tensor, firsts: list[int]) -> ForwardPlan:
        """The plan of several windows starting at latent frames ``firsts``, on one context
        pass (up to the latest window's start)."""
        plans = [self.window_plan(tokens, first) for first in firsts]
        latest = max(plans, key=lambda p: int(p.positions[-1]))
        prefix = self.layout.prefix_length
        windows = tuple((int(p.positions[prefix]), len(p.positions) - prefix) for p in plans)
        return ForwardPlan(
            latest.context_ids, prefix,
            torch.cat([tokens[:, :prefix], *(p.ids[:, prefix:] for p in plans)], dim=1),
            torch.cat([plans[0].positions[:prefix], *(p.positions[prefix:] for p in plans)]),
            prefix, torch.cat([p.labels for p in plans], dim=1), firsts[0],
            self.sampler.window_frames,
            {WINDOW_START: float(firsts[0]), LATEST_WINDOW_START: float(max(firsts))}, windows)

    def plan(self, tokens: torch.Tensor, iteration: int = 0, micro_batch: int = 0) -> ForwardPlan:
        if self.full_sequence_step(iteration):
            plan = FullSequence(self.layout).plan(tokens)
            plan.metrics = {WINDOW_START: 0.0, FULL_SEQUENCE_STEP: 1.0}
            return plan
        if self.windows_per_step > 1:
            plan = self.windows_plan(tokens, [self.sampler.draw(iteration, micro_batch, k)
                                              for k in range(self.windows_per_step)])
        else:
            plan = self.window_plan(tokens, self.sampler.draw(iteration, micro_batch))
        if self.full_sequence_share:
            plan.metrics[FULL_SEQUENCE_STEP] = 0.0
        return plan


class FewerFrames(Objective):
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
                           {CLIP_START: float(first)})


register("objective", "full-sequence")(FullSequence.build)
register("objective", "local-opt", config=LocalOptConfig)(LocalOptimization.build)
register("objective", "fewer-frames")(FewerFrames.build)
