"""Scores of the token-level recall task (``recall-tokens``) on held-out cues, teacher-forced.

* **recall accuracy**: the model's most likely token at each block's lead token of the
  reappearance frame (the only tokens that need the cue, see
  :mod:`localopt_plugin.data.recall_tokens`) is the cue's colour; chance is 1/K;
* **copy accuracy**: the same in the second cue frame (the cue one frame back, inside any
  window that holds both): what a window can teach without long-range context;
* **cue worth**: NLL of the reappearance frame after another cue (every block's colour moved
  by one) minus after the true one, nats per clip: 0 for a model that ignores the cue;
* **attention to the cue**: the share of attention (averaged over layers and heads) that the
  reappearance frame's lead-token queries put on the cue frames' keys.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import torch

from localopt_plugin.data.recall_tokens import RecallTokensConfig, split_cues
from localopt_plugin.errors import UserError
from localopt_plugin.model import compute_logits, forward_hidden


def cue_tokens(config: RecallTokensConfig, cues: np.ndarray) -> torch.Tensor:
    """Whole samples ``[len(cues), seq_length]`` of ``cues`` (indices)."""
    vocab = config.vocabulary()
    head = [vocab.bos, vocab.class_token(0), vocab.bov]
    return torch.tensor(np.stack([
        np.concatenate([head, config.frames_of(config.cue(int(c))).reshape(-1), [vocab.eov]])
        for c in cues]), dtype=torch.long)


def _label_positions(config: RecallTokensConfig, frame: int) -> np.ndarray:
    """Input positions whose labels are the lead tokens of ``frame``."""
    start, _ = config.layout().label_span(frame, 1)
    return start + config.lead_tokens()


@torch.no_grad()
def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits ``[b, s, v]`` of every input position."""
    length = tokens.shape[1] - 1
    device = next(model.parameters()).device
    hidden = forward_hidden(model, tokens[:, :length].to(device),
                            torch.arange(length, device=device))
    return compute_logits(model, hidden).float().transpose(0, 1).cpu()


def _lead_accuracy(logits: torch.Tensor, tokens: torch.Tensor, positions: np.ndarray) -> float:
    predicted = logits[:, positions].argmax(-1)
    return float((predicted == tokens[:, positions + 1]).float().mean())


def _frame_nll(logits: torch.Tensor, tokens: torch.Tensor, config: RecallTokensConfig,
               frame: int) -> torch.Tensor:
    """Summed NLL of ``frame``'s tokens per sample ``[b]``."""
    start, end = config.layout().label_span(frame, 1)
    log_probs = torch.log_softmax(logits[:, start:end], dim=-1)
    labels = tokens[:, start + 1:end + 1]
    return -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1).double().sum(1)


def shifted_cues(config: RecallTokensConfig, cues: np.ndarray) -> np.ndarray:
    """Each cue with every block's colour moved by one (another cue, differing everywhere)."""
    out = []
    for c in cues:
        colours = (config.cue(int(c)) + 1) % config.colours
        out.append(int(sum(int(k) * config.colours ** p for p, k in enumerate(colours))))
    return np.array(out)


def recall_token_scores(model, config: RecallTokensConfig, split: str = "test") -> dict:
    """Every score of the module on every cue of ``split`` (default: the held-out test cues,
    never trained on)."""
    cues = split_cues(config, split)
    tokens = cue_tokens(config, cues)
    with captured_attention(model) as probabilities:  # one forward: logits and attention
        logits = _logits(model, tokens)
    reappear = _label_positions(config, config.reappear)
    scores = {"cues": len(cues), "chance": 1.0 / config.colours,
              "recall accuracy": _lead_accuracy(logits, tokens, reappear)}
    if config.cue_frames >= 2:
        scores["copy accuracy"] = _lead_accuracy(logits, tokens, _label_positions(config, 1))
    after_cue = config.layout().video_start + config.cue_frames * config.frame_tokens
    other = cue_tokens(config, shifted_cues(config, cues))
    other[:, after_cue:] = tokens[:, after_cue:]  # another cue, the rest of the clip kept
    true_nll = _frame_nll(logits, tokens, config, config.reappear)
    other_nll = _frame_nll(_logits(model, other), other, config, config.reappear)
    scores["cue worth (nats per clip)"] = float((other_nll - true_nll).mean())
    scores["reappearance NLL (nats per token)"] = float(true_nll.mean()) / config.frame_tokens
    scores["attention to the cue"] = attention_to_cue(config, probabilities)
    return scores


@contextlib.contextmanager
def captured_attention(model) -> Iterator[list[torch.Tensor]]:
    """While open, every forward of ``model`` appends each layer's causal attention
    probabilities ``[b, heads, s, s]`` to the yielded list, recomputed from the queries and
    keys its core attention receives (after RoPE)."""
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        query = args[0] if args else kwargs["query"]  # [s, b, heads, d]
        key = args[1] if len(args) > 1 else kwargs["key"]  # [s, b, groups, d]
        key = key.repeat_interleave(query.shape[2] // key.shape[2], dim=2)
        scores = torch.einsum("qbhd,kbhd->bhqk", query.float(), key.float())
        scores = scores * module.softmax_scale
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        captured.append(torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1).cpu())

    hooks = [layer.self_attention.core_attention.register_forward_pre_hook(
        capture, with_kwargs=True) for layer in model.decoder.layers]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def attention_probabilities(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's causal attention probabilities of a plain forward of ``input_ids``."""
    with captured_attention(model) as probabilities:
        forward_hidden(model, input_ids, torch.arange(input_ids.shape[1],
                                                      device=input_ids.device))
    return probabilities


def attention_to_cue(config: RecallTokensConfig, probabilities: list[torch.Tensor]) -> float:
    """Mean share of attention the reappearance frame's lead-token queries put on the cue
    frames' keys, over layers, heads and samples."""
    layout = config.layout()
    queries = torch.as_tensor(_label_positions(config, config.reappear))
    keys = slice(layout.video_start, layout.video_start + config.cue_frames * config.frame_tokens)
    return float(np.mean([p[:, :, queries][..., keys].sum(-1).mean().item()
                          for p in probabilities]))


def score_checkpoints(directory: str, every: bool = False, split: str = "test") -> list[dict]:
    """The latest (or every) checkpoint of a ``recall-tokens`` run scored on ``split``'s cues,
    in iteration order (needs the process groups of a world of one)."""
    from localopt_plugin.training.config import dataset_from_saved
    from localopt_plugin.training.convert import load_trained_model

    tags = sorted(t for t in os.listdir(directory) if t.startswith("iter_")) if every else [None]
    scored = []
    for tag in tags:
        model, meta = load_trained_model(directory, tag)
        name, task = dataset_from_saved(meta["config"])
        if name != "recall-tokens":
            raise UserError(f"{directory} trained on --dataset {name}, not recall-tokens")
        scored.append({"iteration": meta["iteration"], **recall_token_scores(model, task, split)})
    return scored
