"""Analytic training FLOPs of a forward plan: the compute a step costs, independent of the machine.

Why: comparing objectives "at equal compute" by wall-clock time depends on whatever else the
machine runs; counting the multiply-adds of each step does not. A plan's cost is

* the context pass (``no_grad``: forward only): every layer over the context tokens, causal
  attention among them;
* the autograd pass, forward and backward (backward = 2 x forward): every layer over the
  pass's tokens, the head (re-run prefix) attending causally to itself and the tail (window;
  each window, with several per context pass) attending to the head, the kept context before
  it and causally to itself; and the output layer over the loss-carrying positions.

A multiply-add counts 2 FLOPs; embeddings, norms, activations and the softmax are left out
(a few percent of a layer). Megatron-LM's ``num_floating_point_operations`` uses the same
conventions for full sequences.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from localopt_plugin.model import ModelConfig
from localopt_plugin.plan import ForwardPlan


def _layer_flops(config: ModelConfig, tokens: int, attended_pairs: int) -> float:
    """Forward FLOPs of one transformer layer over ``tokens`` queries that attend to
    ``attended_pairs`` (query, key) pairs in total."""
    h = config.hidden_size
    head_dim = config.kv_channels or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.query_groups * head_dim
    ffn = config.ffn_hidden_size or 4 * h
    linear = h * (q + 2 * kv) + q * h + h * ffn * (2 if config.swiglu else 1) + ffn * h
    attention = 2 * q * attended_pairs  # scores and the weighted sum of values
    return 2.0 * (tokens * linear + attention)


def _causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def _autograd_pairs(plan: ForwardPlan) -> int:
    """(query, key) pairs the autograd pass attends to (a window at position ``start`` attends
    to every position before it and causally to itself)."""
    tokens = plan.ids.shape[1]
    if plan.windows:
        return _causal_pairs(plan.loss_from) + sum(
            length * start + _causal_pairs(length) for start, length in plan.windows)
    if plan.context_ids is None:
        return _causal_pairs(tokens)
    head = plan.context_keep_from  # the re-run prefix, at positions [0, head)
    kept = plan.context_ids.shape[1] - plan.context_keep_from
    tail = tokens - head
    return _causal_pairs(head) + tail * (head + kept) + _causal_pairs(tail)


def plan_flops(plan: ForwardPlan, config: ModelConfig, vocab_size: int) -> float:
    """Training FLOPs of one micro-batch's plan (forward, backward, the no-grad context)."""
    batch = plan.ids.shape[0]
    layers = config.num_layers
    context = 0 if plan.context_ids is None else plan.context_ids.shape[1]
    total = 0.0
    if context:
        total += layers * _layer_flops(config, context, _causal_pairs(context))
    forward = layers * _layer_flops(config, plan.ids.shape[1], _autograd_pairs(plan))
    forward += 2.0 * plan.labels.shape[1] * config.hidden_size * vocab_size  # output layer
    total += 3.0 * forward  # forward + backward (2x)
    return batch * total


def recompute_flops(plan: ForwardPlan, config: ModelConfig) -> float:
    """FLOPs activation recomputation adds to a plan's step (not counted by ``plan_flops``,
    which counts the model's FLOPs): the autograd pass's layers run forward again (full:
    ``--recompute-num-layers`` of each chunk under ``block``, all under ``uniform``) or only
    their core attention (selective)."""
    granularity = config.recompute_granularity
    if granularity is None:
        return 0.0
    batch, tokens, pairs = plan.ids.shape[0], plan.ids.shape[1], _autograd_pairs(plan)
    if granularity == "selective":
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        return batch * config.num_layers * 2.0 * 2 * config.num_attention_heads * head_dim * pairs
    layers = (config.num_layers if config.recompute_method == "uniform"
              else config.recompute_num_layers)
    return batch * layers * _layer_flops(config, tokens, pairs)


def replayed_plans(objective, tokens: torch.Tensor, records: list[dict]) -> Iterator[ForwardPlan]:
    """The plans a trainer ran for its logged per-step ``records`` (one micro-batch each), as
    it drew them: each step's metrics are fed back after it (``Objective.observe``), so an
    adaptive sampler's draws follow the logged losses."""
    for iteration, record in enumerate(records):
        yield objective.plan(tokens, iteration, 0)
        objective.observe(record)
