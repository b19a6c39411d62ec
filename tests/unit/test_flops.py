"""The analytic FLOPs of a plan: its matrix products against torch's own FLOP counter on the real
model, its attention against the pairs of the plan's explicit causal mask."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers.configs import preset_model
from helpers.flops_reference import attention_flops, mask_pairs, product_flops

from localopt_plugin.bench.flops import plan_flops
from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.model import build_gpt_model
from localopt_plugin.objectives import FullSequence, LocalOptimization
from localopt_plugin.objectives.sequence import LocalOptConfig

LAYOUT = SampleLayout(video_start=3, num_frames=4, frame_tokens=32)
VOCAB = 100


def _window(*firsts: int):
    return SimpleNamespace(window_frames=2,
                           draw=lambda iteration, micro_batch, index=0: firsts[index])


def _plan(objective: str, tokens: torch.Tensor):
    if objective == "full-sequence":
        return FullSequence(LAYOUT).plan(tokens)
    firsts = [int(c) for c in objective.split()[-1].split(",")]
    config = LocalOptConfig(windows_per_step=len(firsts))
    return LocalOptimization(LAYOUT, _window(*firsts), config).plan(tokens, 0, 0)


@pytest.mark.parametrize("objective", ["full-sequence", "window 0", "window 2",
                                       "windows 2,0,1"])
def test_plan_flops_match_torchs_counter_and_the_mask(dist_world_of_one, objective):
    config = preset_model("test")
    model = build_gpt_model(config, VOCAB)
    tokens = torch.randint(0, VOCAB, (2, LAYOUT.seq_length))
    plan = _plan(objective, tokens)
    padded_vocab = model.output_layer.weight.shape[0]
    products = plan_flops(plan, config, padded_vocab) - attention_flops(plan, config)
    assert products == pytest.approx(product_flops(model, plan), rel=1e-6)


def test_later_windows_cost_more_and_full_sequence_most():
    config = preset_model("test")
    tokens = torch.zeros(1, LAYOUT.seq_length, dtype=torch.long)
    costs = [plan_flops(LocalOptimization(LAYOUT, _window(s)).plan(tokens, 0, 0), config, VOCAB)
             for s in range(3)]
    full = plan_flops(FullSequence(LAYOUT).plan(tokens), config, VOCAB)
    assert costs == sorted(costs) and costs[-1] < full


@pytest.mark.parametrize("objective", ["full-sequence", "window 2"])
def test_recompute_flops_are_the_repeated_forward_torch_counts(dist_world_of_one, objective):
    """Full recomputation's extra matrix products, counted by torch on the real model (the
    recomputed forward runs under the counter too), equal ``recompute_flops`` less its attention
    (the fused kernel the counter does not see: one forward of the autograd pass's pairs)."""
    from localopt_plugin.bench.flops import recompute_flops

    plain = preset_model("test")
    recomputed = preset_model("test", recompute_granularity="full", recompute_method="uniform",
                              recompute_num_layers=1)
    tokens = torch.randint(0, VOCAB, (2, LAYOUT.seq_length))
    plan = (FullSequence(LAYOUT) if objective == "full-sequence" else
            LocalOptimization(LAYOUT, _window(2))).plan(tokens, 0, 0)
    extra = (product_flops(build_gpt_model(recomputed, VOCAB, seed=1), plan)
             - product_flops(build_gpt_model(plain, VOCAB, seed=1), plan))
    width = plain.num_attention_heads * (plain.hidden_size // plain.num_attention_heads)
    keys = plan.positions
    if plan.context_ids is not None:
        context = torch.arange(plan.context_ids.shape[1])
        keys = torch.cat([plan.positions[:plan.context_keep_from],
                          context[plan.context_keep_from:],
                          plan.positions[plan.context_keep_from:]])
    attention = 4 * width * plain.num_layers * plan.ids.shape[0] * mask_pairs(plan.positions,
                                                                              keys)
    assert extra > 0
    assert recompute_flops(plan, recomputed) - attention == pytest.approx(extra, rel=1e-6)
    assert recompute_flops(plan, plain) == 0
