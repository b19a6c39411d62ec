"""Several windows per context pass (``--local-opt-windows-per-step K``): the step's gradient is
the sum of the windows' gradients computed separately, by the plain-PyTorch reference with each
window's context detached (its loss the windows' mean); windows never see one another."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.configs import preset_model
from helpers.reference_gpt import reference_hidden, reference_logits

from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.errors import UserError
from localopt_plugin.model import attention, build_gpt_model
from localopt_plugin.objectives.sequence import LocalOptConfig, LocalOptimization
from localopt_plugin.objectives.window_sampler import AdaptiveWindowSampler, WindowSampler
from localopt_plugin.regularizers.reco import reco_penalty

LAYOUT = SampleLayout(video_start=3, num_frames=5, frame_tokens=8)
VOCAB = 100


def fixed_windows(*firsts: int, frames: int = 2):
    return SimpleNamespace(window_frames=frames,
                           draw=lambda iteration, micro_batch, index=0: firsts[index])


def make(seed: int = 0):
    """The shipped presets' architecture (RoPE, RMSNorm, SwiGLU, GQA, untied)."""
    torch.manual_seed(seed)
    model = build_gpt_model(preset_model("test"), VOCAB)
    return model, torch.randint(0, VOCAB, (2, LAYOUT.seq_length))


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_window_loss(model, tokens, first: int, frames: int = 2,
                          detach_context: bool = True) -> torch.Tensor:
    """One window's loss by the plain-PyTorch forward, its context's keys/values detached."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    start, end = LAYOUT.label_span(first, frames)
    positions = torch.arange(inputs.shape[1])
    context = (positions >= LAYOUT.prefix_length) & (positions < start)
    logits = reference_logits(model, reference_hidden(
        model, inputs, detach_kv=context if detach_context else None))
    return F.cross_entropy(logits[:, start:end].reshape(-1, logits.shape[-1]),
                           labels[:, start:end].reshape(-1))


def assert_grads_close(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6,
                                   msg=name)


@pytest.mark.parametrize("kernel", ["merged blocks", "one call over ordered keys"])
@pytest.mark.parametrize("firsts", [(2, 0, 3), (1, 1), (0, 0)])
def test_gradients_are_the_sum_of_separate_windows(dist_world_of_one, monkeypatch, kernel,
                                                   firsts):
    """Overlapping windows, a window at frame 0, a repeated window, all windows at frame 0 (no
    context pass); on the CPU's merged-block kernel and on the single-call path CUDA takes
    (forced here: ``cuda_available`` patched, SDPA's CPU kernel runs the same call)."""
    if kernel != "merged blocks":
        monkeypatch.setattr(attention, "cuda_available", lambda: True)
    model, tokens = make()
    config = LocalOptConfig(windows_per_step=len(firsts))
    out = LocalOptimization(LAYOUT, fixed_windows(*firsts), config)(model, tokens)
    assert out.windows == len(firsts) and out.first_frame == firsts[0]
    step_grads = grads(model, out.loss)

    separate = [reference_window_loss(model, tokens, first) for first in firsts]
    reference = sum(separate) / len(firsts)
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-5)
    assert_grads_close(step_grads, grads(model, reference))


def test_negative_controls_windows_do_not_see_each_other(dist_world_of_one):
    """Two adjacent windows (frames 1-2 and 3-4) give the same loss as one 4-frame window, but
    not its gradients: in one window the later frames' loss reaches the earlier frames'
    keys/values, across two windows it must not. And the reference depends on detaching."""
    model, tokens = make()
    two = LocalOptimization(LAYOUT, fixed_windows(1, 3), LocalOptConfig(windows_per_step=2))
    out = two(model, tokens)
    two_grads = grads(model, out.loss)
    one = LocalOptimization(LAYOUT, fixed_windows(1, frames=4))(model, tokens)
    torch.testing.assert_close(out.loss, one.loss, rtol=1e-5, atol=1e-5)
    one_grads = grads(model, one.loss)
    assert any(not torch.allclose(two_grads[n], one_grads[n], atol=1e-6) for n in two_grads)
    attached = sum(reference_window_loss(model, tokens, first, detach_context=False)
                   for first in (1, 3)) / 2
    attached_grads = grads(model, attached)
    assert any(not torch.allclose(two_grads[n], attached_grads[n], atol=1e-6)
               for n in two_grads)


def test_context_pass_runs_once_up_to_the_latest_window(dist_world_of_one):
    objective = LocalOptimization(LAYOUT, fixed_windows(1, 3, 0),
                                  LocalOptConfig(windows_per_step=3))
    tokens = torch.arange(LAYOUT.seq_length).repeat(2, 1)
    plan = objective.plan(tokens)
    starts = [LAYOUT.label_span(first, 2)[0] for first in (1, 3, 0)]
    assert plan.context_ids.shape[1] == max(starts)
    assert plan.windows == tuple((start, 2 * LAYOUT.frame_tokens) for start in starts)
    assert plan.positions.tolist() == list(range(LAYOUT.prefix_length)) + [
        p for start in starts for p in range(start, start + 2 * LAYOUT.frame_tokens)]
    assert plan.labels.tolist() == torch.cat(
        [tokens[:, s + 1:s + 1 + 2 * LAYOUT.frame_tokens] for s in starts], 1).tolist()


def test_window_draws_are_independent_draws_of_the_sampler():
    """Window 0 is the one-window draw; the K draws of an iteration are independent draws from
    the sampler's distribution (frequencies, and no dependence between them)."""
    sampler = WindowSampler(9, 2, 1, seed=7, first_prob=0.5)
    assert [sampler.draw(i, 0, 0) for i in range(50)] == [sampler.draw(i, 0) for i in range(50)]
    draws = np.array([[sampler.draw(i, 0, k) for k in range(3)] for i in range(6000)])
    probabilities = dict(zip(sampler.starts, sampler.probabilities(), strict=True))
    for k in range(3):
        for start, p in probabilities.items():
            assert abs((draws[:, k] == start).mean() - p) < 0.025, (k, start)
    both_first = ((draws[:, 0] == 0) & (draws[:, 1] == 0)).mean()
    assert abs(both_first - 0.25) < 0.025
    again = WindowSampler(9, 2, 1, seed=7, first_prob=0.5)
    assert [again.draw(i, 0, 2) for i in range(50)] == draws[:50, 2].tolist()


def test_reco_pairs_stay_inside_each_window():
    """ReCo over K windows is the mean of each window's ReCo (equal windows); treating the
    rows as one run (pairs across the boundary) gives another value."""
    torch.manual_seed(0)
    hidden = torch.randn(3 * 16, 2, 8)
    for pairs in ("adjacent-token", "adjacent-frame"):
        separate = torch.stack([reco_penalty(hidden[i * 16:(i + 1) * 16], 8, pairs)
                                for i in range(3)]).mean()
        torch.testing.assert_close(reco_penalty(hidden, 8, pairs, windows=3), separate)
        assert not torch.allclose(reco_penalty(hidden, 8, pairs), separate)


def test_settings_refused_with_the_flag_named():
    with pytest.raises(UserError, match="--local-opt-windows-per-step"):
        LocalOptConfig(windows_per_step=0).validate()
    adaptive = AdaptiveWindowSampler(5, 2, 1, seed=0, first_prob=0.5, floor=0.25, decay=0.9)
    with pytest.raises(UserError, match="--local-opt-windows-per-step 2 with --window-sampler "
                                        "adaptive"):
        LocalOptimization(LAYOUT, adaptive, LocalOptConfig(windows_per_step=2))
