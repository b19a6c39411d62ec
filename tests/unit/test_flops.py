"""The analytic FLOPs of a plan: its matrix products against torch's own FLOP counter on the real
model, its attention against the pairs of the plan's explicit causal mask."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers.configs import preset_model
from torch.utils.flop_counter import FlopCounterMode

from localopt_plugin.bench.flops import plan_flops
from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.model import build_gpt_model
from localopt_plugin.objectives import FullSequence, LocalOptimization
from localopt_plugin.plan import run_plan

LAYOUT = SampleLayout(video_start=3, num_frames=4, frame_tokens=32)
VOCAB = 100


def _window(first: int):
    return SimpleNamespace(window_frames=2, draw=lambda iteration, micro_batch: first)


def _mask_pairs(query_positions: torch.Tensor, key_positions: torch.Tensor) -> int:
    """(query, key) pairs a causal mask over absolute positions lets through."""
    return int((key_positions[None, :] <= query_positions[:, None]).sum())


def _attention_flops(plan, config) -> float:
    """4 x (query width) FLOPs per attended pair forward, x3 with backward; the context pass
    forward only. Pairs counted from the explicit mask of the plan's positions."""
    width = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    per_pair = 4 * width * config.num_layers * plan.ids.shape[0]
    flops = 0.0
    keys = plan.positions
    if plan.context_ids is not None:
        context = torch.arange(plan.context_ids.shape[1])
        flops += per_pair * _mask_pairs(context, context)
        keys = torch.cat([plan.positions[:plan.context_keep_from],
                          context[plan.context_keep_from:],
                          plan.positions[plan.context_keep_from:]])
    return flops + 3 * per_pair * _mask_pairs(plan.positions, keys)


@pytest.mark.parametrize("objective", ["full-sequence", "window 0", "window 2"])
def test_plan_flops_match_torchs_counter_and_the_mask(dist_world_of_one, objective):
    config = preset_model("test")
    model = build_gpt_model(config, VOCAB)
    tokens = torch.randint(0, VOCAB, (2, LAYOUT.seq_length))
    plan = (FullSequence(LAYOUT) if objective == "full-sequence" else
            LocalOptimization(LAYOUT, _window(int(objective[-1])))).plan(tokens, 0, 0)
    with FlopCounterMode(display=False) as counter:  # counts the matrix products (not SDPA)
        run_plan(model, plan).loss.backward()
    padded_vocab = model.output_layer.weight.shape[0]
    products = plan_flops(plan, config, padded_vocab) - _attention_flops(plan, config)
    assert products == pytest.approx(counter.get_total_flops(), rel=1e-6)


def test_later_windows_cost_more_and_full_sequence_most():
    config = preset_model("test")
    tokens = torch.zeros(1, LAYOUT.seq_length, dtype=torch.long)
    costs = [plan_flops(LocalOptimization(LAYOUT, _window(s)).plan(tokens, 0, 0), config, VOCAB)
             for s in range(3)]
    full = plan_flops(FullSequence(LAYOUT).plan(tokens), config, VOCAB)
    assert costs == sorted(costs) and costs[-1] < full
