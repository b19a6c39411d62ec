"""Autoregressive sampling of video tokens, with or without a KV cache.

Why both: the cached path (one new token per forward, earlier keys/values kept in a
:class:`KVMemory`) is what generation uses; the uncached path (the whole sequence every step)
is the reference it must reproduce token for token. Both draw their randomness the same way,
one uniform number per row and step from a seeded ``torch.Generator`` turned into a token by
inverse-CDF sampling, so equal logits give equal tokens whatever path computed them.

A sample is ``[BOS, condition..., BOV, frame tokens...]`` (:mod:`localopt_plugin.data.layout`);
only video ids ``[0, video_vocab_size)`` are ever sampled. Classifier-free guidance runs the
conditional and the unconditional (null-condition) rows as one batch of ``2b`` rows sharing
one cache, and samples from ``uncond + scale * (cond - uncond)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from localopt_plugin.data.inputs import null_condition
from localopt_plugin.data.layout import SampleLayout, Vocabulary
from localopt_plugin.model import KVMemory, compute_logits, forward_hidden


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters; cfg_scale 1 is none."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0 and self.top_k >= 0
                and 0 < self.top_p <= 1 and math.isfinite(self.cfg_scale)
                and self.cfg_scale >= 0):
            raise ValueError(f"invalid sampling settings {self}: need temperature >= 0, "
                             f"top_k >= 0, 0 < top_p <= 1, cfg_scale >= 0 (all finite)")

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``[b, v]`` logits with everything outside the top-k / the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the more likely ones already reach top_p (the first always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw_tokens(logits: torch.Tensor, config: SamplingConfig,
                generator: torch.Generator | None) -> torch.Tensor:
    """One id per row of ``[b, v]`` logits (already restricted to video ids)."""
    if config.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / config.temperature, config.top_k, config.top_p)
    probs = logits.double().softmax(-1)
    cdf = probs.cumsum(-1)
    u = torch.rand(logits.shape[0], 1, generator=generator, dtype=torch.float64,
                   device=generator.device if generator is not None else logits.device)
    ids = torch.searchsorted(cdf, u.to(cdf.device) * cdf[:, -1:], right=True).squeeze(-1)
    ids = ids.clamp(max=logits.shape[-1] - 1)
    # u * total can round up to the total and land on a filtered (zero) last bin
    filtered = probs.gather(-1, ids[:, None]).squeeze(-1) == 0
    return torch.where(filtered, logits.argmax(-1), ids)


def condition_prefix(vocab: Vocabulary, conditions: torch.Tensor) -> torch.Tensor:
    """``[BOS, condition..., BOV]`` rows for condition ids ``[b, c]``."""
    b = conditions.shape[0]
    bos = torch.full((b, 1), vocab.bos, dtype=torch.long, device=conditions.device)
    bov = torch.full((b, 1), vocab.bov, dtype=torch.long, device=conditions.device)
    return torch.cat([bos, conditions.long(), bov], dim=1)


def null_conditions(vocab: Vocabulary, layout: SampleLayout, batch: int) -> torch.Tensor:
    """The loader's unconditional condition (:func:`null_condition`) for ``batch`` rows."""
    return torch.from_numpy(null_condition(vocab, layout)).repeat(batch, 1)


class _Stepper:
    """Next-token logits for growing sequences, through the KV cache or full recomputation."""

    def __init__(self, model, use_cache: bool) -> None:
        self.model, self.use_cache = model, use_cache
        self.memory: KVMemory | None = None
        self.sequence: torch.Tensor | None = None

    def _last_logits(self, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
        return compute_logits(self.model, hidden[-1:])[0, :, :vocab_size].float()

    def start(self, prefix: torch.Tensor, vocab_size: int) -> torch.Tensor:
        positions = torch.arange(prefix.shape[1], device=prefix.device)
        self.sequence = prefix
        if self.use_cache:
            # one buffer per layer for every position the model can take: no regrowth
            self.memory = KVMemory(0, self.model.max_sequence_length)
            hidden = forward_hidden(self.model, prefix, positions, memory=self.memory,
                                    store_from=0)
        else:
            hidden = forward_hidden(self.model, prefix, positions)
        return self._last_logits(hidden, vocab_size)

    def step(self, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Append ``ids`` ``[rows]`` and return the logits that follow them."""
        self.sequence = torch.cat([self.sequence, ids[:, None]], dim=1)
        length = self.sequence.shape[1]
        if self.use_cache:
            position = torch.tensor([length - 1], device=ids.device)
            hidden = forward_hidden(self.model, ids[:, None], position, memory=self.memory,
                                    store_from=0)
        else:
            hidden = forward_hidden(self.model, self.sequence,
                                    torch.arange(length, device=ids.device))
        return self._last_logits(hidden, vocab_size)


@torch.no_grad()
def sample_continuation(
    model,
    prefix: torch.Tensor,
    num_tokens: int,
    vocab_size: int,
    config: SamplingConfig,
    generator: torch.Generator | None = None,
    unconditional_prefix: torch.Tensor | None = None,
    use_cache: bool = True,
    progress: tqdm | None = None,
) -> torch.Tensor:
    """``num_tokens`` video ids ``[b, n]`` following ``prefix`` ``[b, L]`` (positions from 0).

    With ``config.guided``, ``unconditional_prefix`` ``[b, L]`` is run alongside and the
    logits are guided; both halves receive the same sampled ids.
    """
    b = prefix.shape[0]
    if config.guided:
        if unconditional_prefix is None or unconditional_prefix.shape != prefix.shape:
            raise ValueError("classifier-free guidance needs an unconditional prefix of the "
                             "prefix's shape")
        prefix = torch.cat([prefix, unconditional_prefix])
    stepper = _Stepper(model, use_cache)
    logits = stepper.start(prefix, vocab_size)
    out = torch.empty(b, num_tokens, dtype=torch.long, device=prefix.device)
    for i in range(num_tokens):
        if config.guided:
            cond, uncond = logits[:b], logits[b:]
            logits = uncond + config.cfg_scale * (cond - uncond)
        out[:, i] = draw_tokens(logits, config, generator)
        if progress is not None:
            progress.update(1)
        if i + 1 < num_tokens:
            ids = out[:, i].repeat(2) if config.guided else out[:, i]
            logits = stepper.step(ids, vocab_size)
    return out


@torch.no_grad()
def sample_video_tokens(
    model,
    vocab: Vocabulary,
    layout: SampleLayout,
    conditions: torch.Tensor,
    num_frames: int,
    config: SamplingConfig,
    generator: torch.Generator | None = None,
    mode: str = "full",
    chunk_frames: int | None = None,
    context_frames: int | None = None,
    use_cache: bool = True,
    show_progress: bool = False,
    prompt: torch.Tensor | None = None,
) -> torch.Tensor:
    """Frame tokens ``[b, num_frames, frame_tokens]`` for condition ids ``[b, c]``; with
    ``prompt`` ``[b, k, frame_tokens]`` its frames are the first ``k`` and the rest is sampled.

    ``mode="full"``: one sequence, positions continue over every frame (the paper's
    inference). ``mode="chunked"``: chunks of ``chunk_frames`` new frames; chunk 0 follows the
    condition alone, chunk ``k > 0`` sees ``[BOS, condition, BOV, last context_frames frames]``
    re-positioned from 0 (the fewer-frames training layout; ``context_frames`` defaults to
    ``chunk_frames``, i.e. the previous chunk).
    """
    if mode not in ("full", "chunked"):
        raise ValueError(f"mode must be 'full' or 'chunked', got {mode!r}")
    if conditions.shape[1] != layout.video_start - 2:
        raise ValueError(f"conditions have {conditions.shape[1]} ids, the layout expects "
                         f"{layout.video_start - 2}")
    p = layout.frame_tokens
    given = 0 if prompt is None else prompt.shape[1]
    if prompt is not None and (prompt.shape[0] != conditions.shape[0] or prompt.shape[2] != p
                               or given >= num_frames):
        raise ValueError(f"prompt {list(prompt.shape)} must be [{conditions.shape[0]}, "
                         f"k < {num_frames}, {p}]")
    chunk = num_frames if mode == "full" else (chunk_frames or layout.num_frames)
    context = num_frames if mode == "full" else (
        chunk if context_frames is None else context_frames)
    if chunk < 1 or context < 0:
        raise ValueError(f"chunk frames {chunk} must be >= 1 and context frames {context} >= 0")
    needed, done = 0, given  # frames in the longest forward of the chunk schedule
    while done < num_frames:
        new = min(chunk, num_frames - done)
        needed, done = max(needed, min(context, done) + new), done + new
    longest = layout.video_start + needed * p - 1  # the last sampled id is never fed back
    if longest > model.max_sequence_length:
        raise ValueError(f"generation needs {longest} positions but the model has "
                         f"--max-position-embeddings {model.max_sequence_length}")
    device = next(model.parameters()).device
    conditions = conditions.to(device)
    prefix = condition_prefix(vocab, conditions)
    uncond = condition_prefix(vocab, null_conditions(vocab, layout, conditions.shape[0]).to(
        device)) if config.guided else None
    frames: list[torch.Tensor] = [] if prompt is None else list(prompt.to(device).unbind(1))
    bar = tqdm(total=(num_frames - given) * p, unit="token",
               disable=not show_progress, desc="sampling")
    with bar:
        while len(frames) < num_frames:
            kept = frames[len(frames) - min(context, len(frames)):] if frames else []
            ctx = torch.cat([f.reshape(f.shape[0], p) for f in kept], 1) if kept else None
            new = min(chunk, num_frames - len(frames))
            seq = prefix if ctx is None else torch.cat([prefix, ctx], 1)
            useq = None
            if uncond is not None:
                useq = uncond if ctx is None else torch.cat([uncond, ctx], 1)
            ids = sample_continuation(model, seq, new * p, vocab.video_vocab_size, config,
                                      generator, useq, use_cache, bar)
            frames.extend(ids.reshape(ids.shape[0], new, p).unbind(1))
    return torch.stack(frames, dim=1)
