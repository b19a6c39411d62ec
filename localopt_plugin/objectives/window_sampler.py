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

The ``adaptive`` sampler learns where to look: it draws the windows after the first in
proportion to a smoothed recent loss of each window start (with a floor), from the losses the
trainer feeds back after every step (:meth:`WindowSampler.observe`), averaged over ranks and
rounded so that any layout with the same global batch draws the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from megatron.core import parallel_state

from localopt_plugin.config_flags import FlagConfig, option
from localopt_plugin.errors import UserError
from localopt_plugin.registry import register

WINDOW_SCOPES = ("step", "micro-batch")


@dataclass(frozen=True)
class WindowConfig(FlagConfig):
    """The windows Local Optimization (and the fewer-frames baseline) draw from."""

    PREFIX: ClassVar[str] = "--local-opt-"
    GROUP: ClassVar[str] = "localopt-plugin: windows"

    window_frames: int = option(2, "W: latent frames optimized per step")
    stride_frames: int = option(1, "S: candidate window starts every S frames (S < W overlaps "
                                "windows)")
    first_window_prob: float = option(0.5, "p: probability of drawing the window that starts "
                                      "at frame 0")
    scope: str = option("step", "step: one window per iteration for the whole global batch "
                        "(equal work on every rank); micro-batch: a window per global "
                        "micro-batch (more windows per step, ranks wait on the longest "
                        "context)", flag="--local-opt-window-scope", choices=WINDOW_SCOPES)

    def validate(self, num_frames: int | None = None) -> None:
        """Raises :class:`UserError` naming the flag of a bad value; with ``num_frames`` (the
        dataset's latent frames), also a window longer than the video."""
        for name in ("window_frames", "stride_frames"):
            if getattr(self, name) <= 0:
                raise UserError(f"{self.flag(name)} must be positive, got "
                                f"{getattr(self, name)}")
        if not 0.0 <= self.first_window_prob <= 1.0:
            raise UserError(f"{self.flag('first_window_prob')} must be in [0, 1], got "
                            f"{self.first_window_prob}")
        if self.scope not in WINDOW_SCOPES:
            raise UserError(f"{self.flag('scope')} must be one of {', '.join(WINDOW_SCOPES)}, "
                            f"got {self.scope!r}")
        if num_frames is not None and self.window_frames > num_frames:
            raise UserError(f"{self.flag('window_frames')} {self.window_frames} exceeds the "
                            f"{num_frames} latent frames of a sample")


def global_micro_batch(accumulation_step: int) -> int:
    """This rank's micro-batch ``accumulation_step`` as an index into the step's global batch
    (what keys a draw; the one place every executor computes it)."""
    return (accumulation_step * parallel_state.get_data_parallel_world_size()
            + parallel_state.get_data_parallel_rank())


def candidate_starts(num_frames: int, window_frames: int, stride_frames: int) -> list[int]:
    """First frames of the candidate windows (the settings checked by :class:`WindowConfig`)."""
    starts = list(range(0, num_frames - window_frames + 1, stride_frames))
    if starts[-1] != num_frames - window_frames:
        starts.append(num_frames - window_frames)
    return starts


class WindowSampler:
    """Draws a window start from the candidates; ``first_prob`` is P(start = 0).

    ``first_prob=None`` draws uniformly over all candidates.
    """

    learns_from_losses: ClassVar[bool] = False  # its draws follow the losses fed to observe()

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

    def _rng(self, iteration: int, micro_batch: int, index: int = 0) -> np.random.Generator:
        key = [self.seed, 0x57A27, iteration]
        if self.scope == "micro-batch":
            key.append(micro_batch)
        if index:  # a further window of the same context pass: its own independent draw
            key += [0x3D0, index]
        return np.random.default_rng(key)

    def draw(self, iteration: int, micro_batch: int, index: int = 0) -> int:
        """The window start of global micro-batch ``micro_batch`` of ``iteration`` (with
        several windows per context pass, of its window ``index``)."""
        rng = self._rng(iteration, micro_batch, index)
        if self.first_prob is None or len(self.starts) == 1:
            return self.starts[int(rng.integers(len(self.starts)))]
        if rng.random() < self.first_prob:
            return 0
        return self.starts[1 + int(rng.integers(len(self.starts) - 1))]

    def observe(self, start: int, loss: float) -> None:
        """A finished step's window start and its LM loss averaged over ranks (samplers that
        do not learn from losses ignore it)."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps so that a resumed run draws what an uninterrupted one would."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


class AdaptiveWindowSampler(WindowSampler):
    """P(start 0) = ``first_prob`` as in the balanced draw; the other candidates share the rest,
    ``floor`` of it evenly and the remainder in proportion to each start's loss, smoothed over
    the steps that trained it (``decay`` per observation). A start not trained yet counts the
    highest smoothed loss so far (1.0 before any), so every window is tried early."""

    ROUND = 4  # decimals kept of an observed loss: float noise of other layouts' sums is far below
    learns_from_losses: ClassVar[bool] = True

    def __init__(self, num_frames: int, window_frames: int, stride_frames: int, seed: int,
                 first_prob: float, floor: float, decay: float) -> None:
        super().__init__(num_frames, window_frames, stride_frames, seed, first_prob, "step")
        self.floor, self.decay = floor, decay
        self.smoothed: dict[int, float] = {}

    def _later_shares(self) -> np.ndarray:
        """Shares of the candidates after the first, summing to 1."""
        later = self.starts[1:]
        unseen = max(self.smoothed.values(), default=1.0)
        losses = np.array([self.smoothed.get(s, unseen) for s in later], dtype=np.float64)
        spread = losses / losses.sum() if losses.sum() > 0 else np.full(len(later), 1 / len(later))
        return self.floor / len(later) + (1.0 - self.floor) * spread

    def probabilities(self) -> list[float]:
        if len(self.starts) == 1:
            return [1.0]
        return [self.first_prob] + ((1.0 - self.first_prob) * self._later_shares()).tolist()

    def draw(self, iteration: int, micro_batch: int, index: int = 0) -> int:
        if len(self.starts) == 1:
            return 0
        rng = self._rng(iteration, micro_batch, index)
        if rng.random() < self.first_prob:
            return 0
        shares = np.cumsum(self._later_shares())
        pick = int(np.searchsorted(shares, rng.random() * shares[-1], side="right"))
        return self.starts[1 + min(pick, len(shares) - 1)]

    def observe(self, start: int, loss: float) -> None:
        if start not in self.starts or not np.isfinite(loss):
            return
        loss = round(float(loss), self.ROUND)
        before = self.smoothed.get(start)
        self.smoothed[start] = loss if before is None else (
            self.decay * before + (1.0 - self.decay) * loss)

    def state_dict(self) -> dict:
        return {"smoothed loss per start": {str(k): v for k, v in self.smoothed.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.smoothed = {int(k): float(v)
                         for k, v in state.get("smoothed loss per start", {}).items()}


@dataclass(frozen=True)
class AdaptiveWindowConfig(WindowConfig):
    """The window flags plus the adaptive sampler's own (``--window-sampler adaptive``)."""

    PREFIX: ClassVar[str] = "--local-opt-adaptive-"
    GROUP: ClassVar[str] = "localopt-plugin: adaptive window sampler (--window-sampler adaptive)"

    floor: float = option(0.25, "share of the later windows' draws spread evenly, the rest in "
                          "proportion to their recent loss")
    decay: float = option(0.9, "smoothing of each window start's loss per step that trained it")
    learns_from_losses: ClassVar[bool] = True  # needs the trainer's loss feedback

    def validate(self, num_frames: int | None = None) -> None:
        super().validate(num_frames)
        if not 0.0 <= self.floor <= 1.0:
            raise UserError(f"{self.flag('floor')} must be in [0, 1], got {self.floor}")
        if not 0.0 <= self.decay < 1.0:
            raise UserError(f"{self.flag('decay')} must be in [0, 1), got {self.decay}")
        if self.scope != "step":
            raise UserError(f"--window-sampler adaptive learns from each step's loss, one "
                            f"window per step: use {self.flag('scope')} step")


@register("window_sampler", "adaptive", config=AdaptiveWindowConfig)
def adaptive(config: AdaptiveWindowConfig, *, num_frames: int, seed: int) -> WindowSampler:
    config.validate(num_frames)
    return AdaptiveWindowSampler(num_frames, config.window_frames, config.stride_frames, seed,
                                 first_prob=config.first_window_prob, floor=config.floor,
                                 decay=config.decay)


@register("window_sampler", "first-frame-balanced", config=WindowConfig)
def first_frame_balanced(config: WindowConfig, *, num_frames: int, seed: int) -> WindowSampler:
    return WindowSampler(num_frames, config.window_frames, config.stride_frames, seed,
                         first_prob=config.first_window_prob, scope=config.scope)


@register("window_sampler", "uniform", config=WindowConfig)
def uniform(config: WindowConfig, *, num_frames: int, seed: int) -> WindowSampler:
    return WindowSampler(num_frames, config.window_frames, config.stride_frames, seed,
                         first_prob=None, scope=config.scope)
