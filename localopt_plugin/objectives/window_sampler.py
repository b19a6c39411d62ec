"""Where a window is sampled: frame-aligned windows and the first-frame balanced draw.

Candidate windows of ``W`` frames start every ``S`` frames; the last candidate always ends at
the last frame. The draw depends only on ``(seed, iteration, micro_batch)``: every
data-parallel rank draws the same window (no rank waits on a longer step) and a resumed run
draws what an uninterrupted one would have.
"""

from __future__ import annotations

import argparse

import numpy as np

from localopt_plugin.registry import register


def candidate_starts(num_frames: int, window_frames: int, stride_frames: int) -> list[int]:
    """First frames of the candidate windows; raises ValueError on invalid settings."""
    if window_frames <= 0:
        raise ValueError(f"--local-opt-window-frames must be positive, got {window_frames}")
    if stride_frames <= 0:
        raise ValueError(f"--local-opt-stride-frames must be positive, got {stride_frames}")
    if window_frames > num_frames:
        raise ValueError(f"--local-opt-window-frames {window_frames} exceeds the "
                         f"{num_frames} latent frames of a sample")
    starts = list(range(0, num_frames - window_frames + 1, stride_frames))
    if starts[-1] != num_frames - window_frames:
        starts.append(num_frames - window_frames)
    return starts


class WindowSampler:
    """Draws a window start from the candidates; ``first_prob`` is P(start = 0).

    ``first_prob=None`` draws uniformly over all candidates.
    """

    def __init__(self, num_frames: int, window_frames: int, stride_frames: int, seed: int,
                 first_prob: float | None = None) -> None:
        if first_prob is not None and not 0.0 <= first_prob <= 1.0:
            raise ValueError(f"--local-opt-first-window-prob must be in [0, 1], got {first_prob}")
        self.starts = candidate_starts(num_frames, window_frames, stride_frames)
        self.window_frames, self.seed, self.first_prob = window_frames, seed, first_prob

    def draw(self, iteration: int, micro_batch: int) -> int:
        rng = np.random.default_rng([self.seed, 0x57A27, iteration, micro_batch])
        if self.first_prob is None or len(self.starts) == 1:
            return self.starts[int(rng.integers(len(self.starts)))]
        if rng.random() < self.first_prob:
            return 0
        return self.starts[1 + int(rng.integers(len(self.starts) - 1))]


@register("window_sampler", "first-frame-balanced")
def first_frame_balanced(args: argparse.Namespace, num_frames: int) -> WindowSampler:
    return WindowSampler(num_frames, args.local_opt_window_frames, args.local_opt_stride_frames,
                         args.seed, first_prob=args.local_opt_first_window_prob)


@register("window_sampler", "uniform")
def uniform(args: argparse.Namespace, num_frames: int) -> WindowSampler:
    return WindowSampler(num_frames, args.local_opt_window_frames, args.local_opt_stride_frames,
                         args.seed, first_prob=None)
