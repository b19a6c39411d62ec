"""Where a window is sampled: frame-aligned windows and the first-frame balanced draw.

Candidate windows of ``W`` frames start every ``S`` frames; the last candidate always ends at
the last frame. A draw is a pure function of ``(seed, iteration, global micro-batch)``, where
the global micro-batch index of a step is ``accumulation_step * data_parallel_size +
data_parallel_rank`` (the order in which the loaders hand out a global batch's samples). So any
parallel layout with the same global batch trains the same windows, and a resumed run draws
what an uninterrupted one would have. ``--local-opt-window-scope`` chooses the granularity:

* ``step``: one window per iteration, shared by every micro-batch of the global batch: every
  rank does the same work (no rank waits for a longer context);
* ``micro-batch``: a window per global micro-batch: more windows per step (a lower-variance
  gradient), but each step lasts as long as its longest context on any rank.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
from megatron.core import parallel_state

from localopt_plugin.errors import UserError
from localopt_plugin.registry import register

WINDOW_SCOPES = ("step", "micro-batch")


@dataclass(frozen=True)
class WindowConfig:
    """The windows Local Optimization (and the fewer-frames baseline) draw from."""

    window_frames: int = 2
    stride_frames: int = 1
    first_window_prob: float = 0.5
    scope: str = "step"

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("localopt-plugin: windows")
        g.add_argument("--local-opt-window-frames", type=int, default=2,
                       help="W: latent frames optimized per step")
        g.add_argument("--local-opt-stride-frames", type=int, default=1,
                       help="S: candidate window starts every S frames (S < W overlaps "
                       "windows)")
        g.add_argument("--local-opt-first-window-prob", type=float, default=0.5,
                       help="p: probability of drawing the window that starts at frame 0")
        g.add_argument("--local-opt-window-scope", choices=WINDOW_SCOPES, default="step",
                       help="step: one window per iteration for the whole global batch (equal "
                       "work on every rank); micro-batch: a window per global micro-batch "
                       "(more windows per step, ranks wait on the longest context)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WindowConfig:
        config = cls(window_frames=args.local_opt_window_frames,
                     stride_frames=args.local_opt_stride_frames,
                     first_window_prob=args.local_opt_first_window_prob,
                     scope=getattr(args, "local_opt_window_scope", "step"))
        config.validate()
        return config

    def validate(self, num_frames: int | None = None) -> None:
        """Raises :class:`UserError` naming the flag of a bad value; with ``num_frames`` (the
        dataset's latent frames), also a window longer than the video."""
        if self.window_frames <= 0:
            raise UserError(f"--local-opt-window-frames must be positive, got "
                             f"{self.window_frames}")
        if self.stride_frames <= 0:
            raise UserError(f"--local-opt-stride-frames must be positive, got "
                             f"{self.stride_frames}")
        if not 0.0 <= self.first_window_prob <= 1.0:
            raise UserError(f"--local-opt-first-window-prob must be in [0, 1], got "
                             f"{self.first_window_prob}")
        if self.scope not in WINDOW_SCOPES:
            raise UserError(f"--local-opt-window-scope must be one of "
                             f"{', '.join(WINDOW_SCOPES)}, got {self.scope!r}")
        if num_frames is not None and self.window_frames > num_frames:
            raise UserError(f"--local-opt-window-frames {self.window_frames} exceeds the "
                            f"{num_frames} latent frames of a sample")


def global_micro_batch(accumulation_step: int) -> int:
    """This rank's micro-batch ``accumulation_step`` as an index into the step's global batch
    (what keys a draw; the one place every executor computes it)."""
    return (accumulation_step * parallel_state.get_data_parallel_world_size()
            + parallel_state.get_data_parallel_rank())


def candidate_starts(num_frames: int, window_frames: int, stride_frames: int) -> list[int]:
    """First frames of the candidate windows; raises :class:`UserError` on invalid settings."""
    WindowConfig(window_frames, stride_frames).validate(num_frames)
    starts = list(range(0, num_frames - window_frames + 1, stride_frames))
    if starts[-1] != num_frames - window_frames:
        starts.append(num_frames - window_frames)
    return starts


class WindowSampler:
    """Draws a window start from the candidates; ``first_prob`` is P(start = 0).

    ``first_prob=None`` draws uniformly over all candidates.
    """

    def __init__(self, num_frames: int, window_frames: int, stride_frames: int, seed: int,
                 first_prob: float | None = None, scope: str = "step") -> None:
        WindowConfig(window_frames, stride_frames, 0.0 if first_prob is None else first_prob,
                     scope).validate(num_frames)
        self.starts = candidate_starts(num_frames, window_frames, stride_frames)
        self.window_frames, self.seed, self.first_prob = window_frames, seed, first_prob
        self.scope = scope

    def probabilities(self) -> list[float]:
        """P(start) of each candidate in ``starts`` (what an expected cost weighs by)."""
        n = len(self.starts)
        if self.first_prob is None or n == 1:
            return [1.0 / n] * n
        return [self.first_prob] + [(1.0 - self.first_prob) / (n - 1)] * (n - 1)

    def draw(self, iteration: int, micro_batch: int) -> int:
        """The window start of global micro-batch ``micro_batch`` of ``iteration``."""
        key = [self.seed, 0x57A27, iteration]
        if self.scope == "micro-batch":
            key.append(micro_batch)
        rng = np.random.default_rng(key)
        if self.first_prob is None or len(self.starts) == 1:
            return self.starts[int(rng.integers(len(self.starts)))]
        if rng.random() < self.first_prob:
            return 0
        return self.starts[1 + int(rng.integers(len(self.starts) - 1))]


@register("window_sampler", "first-frame-balanced", config=WindowConfig)
def first_frame_balanced(config: WindowConfig, *, num_frames: int, seed: int) -> WindowSampler:
    return WindowSampler(num_frames, config.window_frames, config.stride_frames, seed,
                         first_prob=config.first_window_prob, scope=config.scope)


@register("window_sampler", "uniform", config=WindowConfig)
def uniform(config: WindowConfig, *, num_frames: int, seed: int) -> WindowSampler:
    return WindowSampler(num_frames, config.window_frames, config.stride_frames, seed,
                         first_prob=None, scope=config.scope)
