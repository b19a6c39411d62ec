"""The Megatron-Core GPTModel with the plugin's SDPA core attention, in one process."""

from __future__ import annotations

import pytest
import torch
from helpers.configs import tiny_model

from localopt_plugin.model import build_gpt_model, compute_logits, forward_hidden, token_losses
from localopt_plugin.model.attention import SDPAttention


@pytest.mark.parametrize("position_embedding", ["learned_absolute", "rope"])
def test_forward_matches_megatron_gptmodel_forward(dist_world_of_one, position_embedding):
    """The plugin's forward driver gives the logits of GPTModel.forward itself."""
    torch.manual_seed(0)
    args = tiny_model("--position-embedding-type", position_embedding)
    model = build_gpt_model(args, vocab_size=100)
    assert all(isinstance(layer.self_attention.core_attention, SDPAttention)
               for layer in model.decoder.layers)
    ids = torch.randint(0, 100, (2, 40))
    positions = torch.arange(40)
    ours = compute_logits(model, forward_hidden(model, ids, positions)).transpose(0, 1)
    reference = model(ids, positions.expand(2, -1), None)  # Megatron's own path (labels=None)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_sdpa_matches_explicit_softmax_attention(dist_world_of_one):
    """SDPA core attention equals a hand-written causal softmax(QK^T)V, with GQA."""
    args = tiny_model("--group-query-attention", "--num-query-groups", "2")
    model = build_gpt_model(args, vocab_size=100)
    core = model.decoder.layers[0].self_attention.core_attention
    s, b, heads, groups, dim = 7, 2, 4, 2, 16
    q = torch.randn(s, b, heads, dim)
    k, v = torch.randn(s, b, groups, dim), torch.randn(s, b, groups, dim)
    out = core(q, k, v, None)
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, kk) / dim**0.5
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), vv).reshape(s, b, -1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_loss_decreases_on_fixed_batch(dist_world_of_one):
    torch.manual_seed(0)
    args = tiny_model()
    model = build_gpt_model(args, vocab_size=100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 100, (4, 33))
    positions = torch.arange(32)
    losses = []
    for _ in range(50):
        loss = token_losses(model, forward_hidden(model, ids[:, :-1], positions),
                            ids[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
