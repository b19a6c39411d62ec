"""ReCo (Representation Continuity, Zhou & Shen, ACL 2026): penalise jumps between the hidden
states of neighbouring video tokens.

    L = lambda * mean over pairs (i, j) and batch of ||h_j - h_i||^2

with the squared norm summed over the hidden size (``--reco-reduction sum``, the paper's form
and the default; ``mean`` divides it by the hidden size). ``h`` is, by default
(``--reco-states pre-norm``), the residual stream before the final norm
(``ObjectiveOutput.pre_norm_hidden``), or with ``final`` the states after it
(``ObjectiveOutput.hidden``): ``[s, b, h]``, the optimized frames' tokens in raster order. The
pairs lie inside it:
``adjacent-token`` pairs positions ``(i, i + 1)``, ``adjacent-frame`` pairs the same spatial
token in consecutive frames ``(i, i + P)`` with ``P`` tokens per frame. Under Local
Optimization ``hidden`` holds only the window, so no pair reaches into the (detached) context
frames; with several windows per context pass it holds the windows one after another, and no
pair spans two of them (``ObjectiveOutput.windows``).

Parallelism. The regularizer needs only the states, so it runs wherever the loss is computed,
i.e. on the last pipeline stage. Under tensor parallelism the decoder's output after the final
norm is replicated on every TP rank (row-parallel linears all-reduce their outputs, the norm is
not sharded): each TP rank computes the identical penalty, as each computes the same
vocab-parallel cross-entropy, and backpropagates the same ``dL/dh``. Under context
parallelism (and under sequence parallelism, over the TP ranks) ``hidden`` is this rank's slice
of the sequence (``out.shard``): the pairs that straddle two
ranks get their far end from the next rank (:func:`~localopt_plugin.model.context_parallel.
rows_after`, a halo of the pairs' stride), and each rank's penalty is its share of the whole
mean; the shares' gradients sum over the ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from localopt_plugin.config_flags import FlagConfig, option
from localopt_plugin.errors import UserError
from localopt_plugin.metric_names import RECO_LOSS, RECO_RAW, RECO_WEIGHT
from localopt_plugin.model.context_parallel import SequenceShard, rows_after
from localopt_plugin.registry import register

if TYPE_CHECKING:
    from localopt_plugin.plan import ObjectiveOutput

PAIR_MODES = ("adjacent-token", "adjacent-frame")
STATES = ("final", "pre-norm")
SCHEDULES = ("constant", "linear-warmup", "cosine", "adaptive")
REDUCTIONS = ("sum", "mean")
ADAPTIVE_CAP = 10.0  # the adaptive weight never exceeds ADAPTIVE_CAP x --reco-weight


def reco_penalty(hidden: torch.Tensor, frame_tokens: int,
                 pairs: str = "adjacent-token", reduction: str = "sum",
                 shard: SequenceShard | None = None, windows: int = 1) -> torch.Tensor:
    """Unweighted ReCo: mean over pairs and batch of the squared L2 distance over the hidden dim.

    hidden: ``[s, b, h]`` with ``s`` a whole number of frames of ``frame_tokens`` tokens.
    Accumulates in at least float32 so that bf16/fp16 hidden states give an accurate value.
    With no pair (one position, or one frame for ``adjacent-frame``) the penalty is 0.
    ``shard`` (context parallelism): ``hidden`` is this rank's rows of the ``s``; the pairs
    that start here and end on a later rank get their far end from it (a halo of the pair's
    stride), and the result is this rank's share of the whole mean.
    ``windows``: the ``s`` rows are that many equal windows in a row; pairs stay inside one.
    """
    if pairs == "adjacent-token":
        stride = 1
    elif pairs == "adjacent-frame":
        stride = frame_tokens
    else:
        raise ValueError(f"unknown ReCo pairs {pairs!r}; choose one of {', '.join(PAIR_MODES)}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [s, b, h], got shape {tuple(hidden.shape)}")
    length = hidden.shape[0] if shard is None else shard.total
    if windows < 1 or length % windows:
        raise ValueError(f"{length} positions are not {windows} equal windows")
    window = length // windows
    if frame_tokens <= 0 or window % frame_tokens:
        raise ValueError(f"{window} positions are not whole frames of {frame_tokens} tokens")
    h = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown ReCo reduction {reduction!r}; choose one of "
                         f"{', '.join(REDUCTIONS)}")
    if window <= stride:
        return h.new_zeros(())
    if shard is not None:
        h = torch.cat([h, rows_after(h, shard, stride)])
    diff = h[stride:] - h[:h.shape[0] - stride]
    # reduction "sum": the paper's squared L2 norm; "mean": per hidden dimension (the same
    # lambda works at any hidden size)
    squared = diff.square().sum(-1) if reduction == "sum" else diff.square().mean(-1)
    if windows > 1:  # drop the pairs that start in one window and end in the next
        first = 0 if shard is None else shard.start
        row = torch.arange(first, first + squared.shape[0], device=squared.device)
        squared = squared * (row % window < window - stride).unsqueeze(-1)
    elif shard is None:
        return squared.mean()
    return squared.sum() / (windows * (window - stride) * hidden.shape[1])


class ReCo:
    """The ReCo regularizer: ``(loss, metrics) = reco(out, iteration)``.

    The weight is a pure function of the iteration and of detached values of the current step,
    so a resumed run reproduces it exactly:

    * ``constant``: ``lambda``.
    * ``linear-warmup``: ``lambda * min(iteration / warmup_iters, 1)`` (0 at iteration 0).
    * ``cosine``: ``lambda * 0.5 * (1 + cos(pi * min(iteration / train_iters, 1)))``, from
      ``lambda`` to 0 over the run.
    * ``adaptive``: ``min(target_ratio * CE / raw, ADAPTIVE_CAP * lambda)`` from the detached
      cross-entropy and unweighted penalty, so that weighted ReCo / CE equals ``target_ratio``
      unless the cap binds (it keeps a near-zero penalty from getting a huge weight). Being
      detached, the weight only rescales the penalty's gradient. CE and the penalty are equal on
      all tensor-parallel ranks, so is the weight; data-parallel ranks each weight their own
      micro-batch, as each computes its own CE.

    ``iteration`` is the trainer's count of completed iterations (0 for the first step). A step
    whose weight is exactly 0 returns a zero loss without computing the penalty.

    Scale: after the final norm each state has squared norm about ``h`` (hidden size), so at
    initialisation unrelated neighbours give a raw penalty near ``2h``; with ``sum`` on those
    states the penalty collapsed them on the main job (hidden 192, lambda 0.1: raw 6e-4, LM
    loss stalled at 6.2 where it reached 4.4 without ReCo by iteration 80). The defaults act on
    the residual stream before the norm with ``sum``, the form that kept NLL in the ReCo sweep
    (docs/RESULTS.md); ``reduction="mean"`` divides the penalty by ``h`` so that lambda does
    not depend on model width.
    """

    def __init__(self, config: ReCoConfig | None = None,
                 train_iters: int | None = None) -> None:
        config = config or ReCoConfig()
        config.validate()
        config.validate_length(train_iters)
        self.config, self.train_iters = config, train_iters

    def scheduled_weight(self, iteration: int) -> float:
        """The weight before any adaptive choice: for ``adaptive``, its cap."""
        config = self.config
        if config.schedule == "linear-warmup" and config.warmup_iters > 0:
            return config.weight * min(iteration / config.warmup_iters, 1.0)
        if config.schedule == "cosine":
            progress = min(iteration / self.train_iters, 1.0)
            return config.weight * 0.5 * (1.0 + math.cos(math.pi * progress))
        if config.schedule == "adaptive":
            return ADAPTIVE_CAP * config.weight if config.target_ratio > 0 else 0.0
        return config.weight

    def adaptive_weight(self, lm_loss: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """``min(target * CE / raw, cap)`` on detached values; the cap when ``raw`` is 0."""
        config = self.config
        cap = ADAPTIVE_CAP * config.weight
        lm_loss, raw = lm_loss.detach().float(), raw.detach().float()
        ratio = config.target_ratio * lm_loss / torch.where(raw > 0, raw, torch.ones_like(raw))
        return torch.where(raw > 0, ratio.clamp(max=cap), torch.full_like(raw, cap))

    def __call__(self, out: ObjectiveOutput,
                 iteration: int) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        config = self.config
        weight: float | torch.Tensor = self.scheduled_weight(iteration)
        if weight == 0:
            # Disabled for this step: no penalty computed; "reco raw" NaN means "not computed".
            return out.loss.new_zeros(()), {RECO_LOSS: 0.0, RECO_RAW: math.nan,
                                            RECO_WEIGHT: 0.0}
        positions = out.hidden.shape[0] if out.shard is None else out.shard.total
        frames = out.num_frames * out.windows
        if frames <= 0 or positions % frames:
            raise ValueError(f"hidden has {positions} positions, not a whole number "
                             f"of {frames} frames")
        frame_tokens = positions // frames
        if config.pairs == "adjacent-frame" and out.num_frames < 2:
            raise UserError("--reco-pairs adjacent-frame needs at least 2 optimized frames "
                             "(e.g. --local-opt-window-frames >= 2)")
        hidden = out.pre_norm_hidden if config.states == "pre-norm" else out.hidden
        raw = reco_penalty(hidden, frame_tokens, config.pairs, config.reduction, out.shard,
                           out.windows)
        whole_raw = out.whole(raw)  # raw is this rank's share under context parallelism
        if config.schedule == "adaptive":
            weight = self.adaptive_weight(out.lm_loss(), whole_raw)
        loss = weight * raw
        return loss, {RECO_LOSS: weight * whole_raw, RECO_RAW: whole_raw,
                      RECO_WEIGHT: weight}


@dataclass(frozen=True)
class ReCoConfig(FlagConfig):
    """The ``--reco-*`` flags. The defaults are the form the ReCo sweep found to keep quality
    (docs/local-optimization.md): the paper's sum and lambda on the final norm's input."""

    PREFIX: ClassVar[str] = "--reco-"
    GROUP: ClassVar[str] = "localopt-plugin: ReCo (--regularizer reco)"

    weight: float = option(0.1, "ReCo lambda (the paper's 0.1; 0 disables ReCo at no cost); "
                           "with --reco-weight-schedule adaptive, the weight is capped at "
                           f"{ADAPTIVE_CAP:g} x lambda")
    pairs: str = option("adjacent-token", "ReCo pairs inside the optimized frames: consecutive "
                        "tokens (i, i+1) or the same spatial token in consecutive frames "
                        "(i, i+P)", choices=PAIR_MODES)
    reduction: str = option("sum", "over the hidden dimension: sum (the paper's squared L2 "
                            "norm; its scale grows with the hidden size) or mean (scale-free)",
                            choices=REDUCTIONS)
    schedule: str = option("constant", "ReCo weight over training: constant lambda; "
                           "linear-warmup 0 -> lambda over --reco-warmup-iters; cosine lambda "
                           "-> 0 over --train-iters; adaptive: chosen each step from detached "
                           "values so that weighted ReCo / LM loss = --reco-target-ratio (at "
                           f"most {ADAPTIVE_CAP:g} x lambda)", flag="--reco-weight-schedule",
                           choices=SCHEDULES)
    warmup_iters: int = option(0, "iterations of the linear-warmup ReCo schedule")
    target_ratio: float = option(0.1, "adaptive ReCo schedule: weighted ReCo loss / LM loss "
                                 "to hold")
    states: str = option("pre-norm", "hidden states ReCo compares: pre-norm (the residual "
                         "stream before the final norm; the form that kept quality in the ReCo "
                         "sweep) or final (after the final norm, what the output layer reads)",
                         choices=STATES)

    # what a run recorded without a field trained with: ReCo acted on the final states before
    # --reco-states existed, and --reco-states defaulted to final until the ReCo sweep
    RECORDED_BEFORE: ClassVar[dict[str, str]] = {"states": "final"}

    def validate(self) -> None:
        """Raises :class:`UserError` naming the flag of a bad value."""
        def one_of(name: str, choices: tuple[str, ...]) -> tuple[bool, str]:
            value = getattr(self, name)
            return value in choices, (f"{self.flag(name)} must be one of {', '.join(choices)}, "
                                      f"got {value!r}")

        checks = (
            (math.isfinite(self.weight) and self.weight >= 0,
             f"{self.flag('weight')} must be >= 0, got {self.weight}"),
            one_of("pairs", PAIR_MODES), one_of("schedule", SCHEDULES),
            (self.warmup_iters >= 0, f"{self.flag('warmup_iters')} must be >= 0, got "
             f"{self.warmup_iters}"),
            (math.isfinite(self.target_ratio) and self.target_ratio >= 0,
             f"{self.flag('target_ratio')} must be >= 0, got {self.target_ratio}"),
            one_of("reduction", REDUCTIONS), one_of("states", STATES),
        )
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def validate_length(self, train_iters: int | None) -> None:
        """The cosine schedule decays over the run's ``train_iters``, so it needs them."""
        if self.schedule == "cosine" and not (train_iters and train_iters > 0):
            raise UserError(f"{self.flag('schedule')} cosine needs --train-iters > 0, "
                            f"got {train_iters}")


@register("regularizer", "reco", config=ReCoConfig)
def build_reco(config: ReCoConfig, *, train_iters: int | None = None) -> ReCo:
    """ReCo configured by the ``--reco-*`` flags (and ``--train-iters`` for ``cosine``);
    raises :class:`UserError` naming the flag of an invalid setting."""
    return ReCo(config, train_iters)
