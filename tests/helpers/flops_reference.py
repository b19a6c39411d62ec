"""Training FLOPs of a plan counted without the plugin's FLOP model: the matrix products by
torch's own FLOP counter on the real model, the attention from the pairs of the plan's explicit
causal mask (which the counter does not see: the attention kernels are fused)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from localopt_plugin.plan import run_plan


def mask_pairs(query_positions: torch.Tensor, key_positions: torch.Tensor) -> int:
    """(query, key) pairs a causal mask over absolute positions lets through."""
    return int((key_positions[None, :] <= query_positions[:, None]).sum())


def attention_flops(plan, config) -> float:
    """4 x (query width) FLOPs per attended pair forward, x3 with backward; the context pass
    forward only. Pairs counted from the explicit mask of the plan's positions."""
    width = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    per_pair = 4 * width * config.num_layers * plan.ids.shape[0]
    flops = 0.0
    if plan.windows:  # each window sees the head, the context before it and itself
        if plan.context_ids is not None:
            context = torch.arange(plan.context_ids.shape[1])
            flops += per_pair * mask_pairs(context, context)
        head = plan.positions[:plan.loss_from]
        pairs = mask_pairs(head, head)
        for start, length in plan.windows:
            window = torch.arange(start, start + length)
            keys = torch.cat([head, torch.arange(len(head), start), window])
            pairs += mask_pairs(window, keys)
        return flops + 3 * per_pair * pairs
    keys = plan.positions
    if plan.context_ids is not None:
        context = torch.arange(plan.context_ids.shape[1])
        flops += per_pair * mask_pairs(context, context)
        keys = torch.cat([plan.positions[:plan.context_keep_from],
                          context[plan.context_keep_from:],
                          plan.positions[plan.context_keep_from:]])
    return flops + 3 * per_pair * mask_pairs(plan.positions, keys)


def product_flops(model, plan) -> float:
    """The matrix products of one training step on ``plan`` (forward, backward), as counted."""
    with FlopCounterMode(display=False) as counter:
        run_plan(model, plan).loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())
