"""Local Optimization: equivalence with full-sequence training, an independent reference for
its gradients, and proof that the context costs no autograd graph."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers.configs import tiny_model
from helpers.reference_gpt import reference_hidden, reference_logits

from localopt_plugin import plan
from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.model import build_gpt_model, compute_logits, forward_hidden
from localopt_plugin.objectives.sequence import FewerFrames, FullSequence, LocalOptimization

LAYOUT = SampleLayout(video_start=3, num_frames=4, frame_tokens=16)
VOCAB = 100


def fixed_window(first: int, frames: int):
    return SimpleNamespace(window_frames=frames, draw=lambda iteration, micro_batch: first)


def make(position_embedding="learned_absolute", seed=0):
    torch.manual_seed(seed)
    model = build_gpt_model(tiny_model("--position-embedding-type", position_embedding), VOCAB)
    tokens = torch.randint(0, VOCAB, (2, LAYOUT.seq_length))
    return model, tokens


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("position_embedding", ["learned_absolute", "rope"])
def test_full_window_equals_full_sequence(dist_world_of_one, position_embedding):
    model, tokens = make(position_embedding)
    full = FullSequence(LAYOUT)(model, tokens)
    full_grads = grads(model, full.loss)
    local = LocalOptimization(LAYOUT, fixed_window(0, LAYOUT.num_frames))(model, tokens)
    local_grads = grads(model, local.loss)
    torch.testing.assert_close(local.loss, full.loss, rtol=1e-5, atol=1e-5)
    assert local_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(local_grads[name], full_grads[name], rtol=1e-5, atol=1e-5,
                                   msg=name)


@pytest.mark.parametrize("position_embedding", ["learned_absolute", "rope"])
@pytest.mark.parametrize("first", [1, 2])
def test_window_logits_equal_full_forward_logits(dist_world_of_one, position_embedding, first):
    model, tokens = make(position_embedding)
    local = LocalOptimization(LAYOUT, fixed_window(first, 2))(model, tokens)
    start, end = LAYOUT.label_span(first, 2)
    with torch.no_grad():
        inputs = tokens[:, :-1]
        full_hidden = forward_hidden(model, inputs, torch.arange(inputs.shape[1]))
        expected = compute_logits(model, full_hidden)[start:end]
    torch.testing.assert_close(compute_logits(model, local.hidden), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first", [0, 1, 2])
def test_gradients_equal_plain_pytorch_reference_with_detached_context(dist_world_of_one, first):
    model, tokens = make()
    local = LocalOptimization(LAYOUT, fixed_window(first, 2))(model, tokens)
    local_grads = grads(model, local.loss)

    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    start, end = LAYOUT.label_span(first, 2)
    positions = torch.arange(inputs.shape[1])
    context = (positions >= LAYOUT.prefix_length) & (positions < start)
    logits = reference_logits(model, reference_hidden(model, inputs, detach_kv=context))
    reference_loss = F.cross_entropy(logits[:, start:end].reshape(-1, logits.shape[-1]),
                                     labels[:, start:end].reshape(-1))
    torch.testing.assert_close(local.loss, reference_loss, rtol=1e-5, atol=1e-5)
    reference_grads = grads(model, reference_loss)
    assert local_grads.keys() == reference_grads.keys()
    for name in reference_grads:
        torch.testing.assert_close(local_grads[name], reference_grads[name], rtol=1e-4,
                                   atol=1e-6, msg=name)
    if first > 0:  # the reference does depend on detaching: without it gradients differ
        plain = reference_logits(model, reference_hidden(model, inputs))
        plain_loss = F.cross_entropy(plain[:, start:end].reshape(-1, plain.shape[-1]),
                                     labels[:, start:end].reshape(-1))
        plain_grads = grads(model, plain_loss)
        assert any(not torch.allclose(plain_grads[n], reference_grads[n], atol=1e-6)
                   for n in reference_grads)


def test_context_builds_no_graph_and_later_frames_are_not_computed(dist_world_of_one,
                                                                   monkeypatch):
    model, tokens = make()
    first, frames = 1, 2
    start, end = LAYOUT.label_span(first, frames)
    calls = []
    real_forward_hidden = plan.forward_hidden

    def recording_forward_hidden(model, input_ids, positions, memory=None, store_from=None,
                                 shard=None, windows=()):
        saved = []

        def pack(t):
            saved.append(t.shape)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = real_forward_hidden(model, input_ids, positions, memory=memory,
                                      store_from=store_from, shard=shard, windows=windows)
        calls.append(SimpleNamespace(positions=positions.clone(), saved=len(saved),
                                     grad_enabled=torch.is_grad_enabled(), out=out,
                                     memory=memory))
        return out

    monkeypatch.setattr(plan, "forward_hidden", recording_forward_hidden)
    embedded = []
    handle = model.embedding.register_forward_hook(
        lambda module, inputs, output: embedded.append(output.shape[0]))
    out = LocalOptimization(LAYOUT, fixed_window(first, frames))(model, tokens)
    handle.remove()

    context_pass, window_pass = calls
    assert not context_pass.grad_enabled and context_pass.saved == 0
    assert context_pass.out.grad_fn is None and not context_pass.out.requires_grad
    assert context_pass.positions.tolist() == list(range(start))
    kept = context_pass.memory
    assert sorted(kept.layers) == [1, 2]
    for layer, (key, value) in kept.layers.items():
        assert key.grad_fn is None and value.grad_fn is None
        kept_positions = list(range(kept.kept_from, kept.filled_until(layer)))
        assert kept_positions == list(range(LAYOUT.prefix_length, start))
    assert window_pass.grad_enabled and window_pass.saved > 0
    assert window_pass.positions.tolist() == (list(range(LAYOUT.prefix_length))
                                              + list(range(start, end)))
    # every position computed is before the window's end: later frames are never run
    assert max(int(c.positions.max()) for c in calls) == end - 1 < LAYOUT.input_length - 1
    assert sum(embedded) == start + LAYOUT.prefix_length + (end - start)
    assert out.hidden.shape[0] == end - start and out.num_tokens == 2 * (end - start)


def test_fewer_frames_trains_a_clip_without_earlier_context(dist_world_of_one):
    model, tokens = make()
    first, frames = 2, 2
    out = FewerFrames(LAYOUT, fixed_window(first, frames))(model, tokens)
    v, p = LAYOUT.video_start, LAYOUT.frame_tokens
    clip = torch.cat([tokens[:, :v], tokens[:, v + first * p: v + (first + frames) * p]], 1)
    logits = reference_logits(model, reference_hidden(model, clip[:, :-1]))
    start = LAYOUT.prefix_length
    expected = F.cross_entropy(logits[:, start:].reshape(-1, logits.shape[-1]),
                               clip[:, 1:][:, start:].reshape(-1))
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    assert out.hidden.shape[0] == frames * p
