"""An independent plain-PyTorch GPT forward over a Megatron-Core GPTModel's weights.

Used as the reference for Local Optimization: ``detach_kv`` marks positions whose keys and
values are detached in every layer (the context), which is what Local Opt. computes without
running those positions under autograd. The attention is the textbook masked softmax over the
full score matrix. Covers both configurations the tests use: the simplest (pre-LayerNorm, GELU
MLP with biases, learned absolute positions, tied embeddings) and the shipped presets'
(RMSNorm, SwiGLU, no biases, rotary positions, grouped-query attention, untied output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _norm(x: torch.Tensor, p: dict, name: str, kind: str, eps: float) -> torch.Tensor:
    if kind == "RMSNorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * p[name + ".weight"]
    return F.layer_norm(x, (x.shape[-1],), p[name + ".weight"], p[name + ".bias"], eps)


def _rotary(t: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Megatron's (non-interleaved) rotary embedding of ``t`` ``[b, s, heads, d]``."""
    dim = t.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                           device=t.device) / dim)
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]
    first, second = t.chunk(2, dim=-1)
    return t * emb.cos() + torch.cat([-second, first], dim=-1) * emb.sin()


def reference_hidden(model, ids: torch.Tensor, detach_kv: torch.Tensor | None = None,
                     ) -> torch.Tensor:
    """Final (normed) hidden states ``[b, s, h]`` of a causal forward over ``ids`` ``[b, s]``."""
    p = dict(model.named_parameters())
    cfg = model.config
    heads, dim = cfg.num_attention_heads, cfg.kv_channels
    groups = cfg.num_query_groups or heads
    eps, kind = cfg.layernorm_epsilon, cfg.normalization
    b, s = ids.shape
    pos = torch.arange(s, device=ids.device)
    x = p["embedding.word_embeddings.weight"][ids]
    rope = model.position_embedding_type == "rope"
    if not rope:
        x = x + p["embedding.position_embeddings.weight"][pos]
    causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
    for i in range(cfg.num_layers):
        pre = f"decoder.layers.{i}."

        def linear(t, name, pre=pre):
            return F.linear(t, p[pre + name + ".weight"], p.get(pre + name + ".bias"))

        qkv = linear(_norm(x, p, pre + "input_layernorm", kind, eps), "self_attention.linear_qkv")
        # Megatron's fused layout per query group: [q of its heads | k | v], head_dim each
        per_group = heads // groups
        q, k, v = qkv.view(b, s, groups, (per_group + 2) * dim).split(
            [per_group * dim, dim, dim], dim=-1)
        q = q.reshape(b, s, heads, dim)
        if rope:
            q, k = _rotary(q, pos, model.rotary_base), _rotary(k, pos, model.rotary_base)
        if detach_kv is not None:
            keep = (~detach_kv).view(1, s, 1, 1).to(k.dtype)
            k = k * keep + k.detach() * (1 - keep)
            v = v * keep + v.detach() * (1 - keep)
        k, v = k.repeat_interleave(per_group, dim=2), v.repeat_interleave(per_group, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / dim**0.5
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, heads * dim)
        x = x + linear(attn, "self_attention.linear_proj")
        h = linear(_norm(x, p, pre + "pre_mlp_layernorm", kind, eps), "mlp.linear_fc1")
        if cfg.gated_linear_unit:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        x = x + linear(h, "mlp.linear_fc2")
    return _norm(x, p, "decoder.final_layernorm", kind, eps)


def reference_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    if model.share_embeddings_and_output_weights:
        return hidden @ model.embedding.word_embeddings.weight.T
    return hidden @ model.output_layer.weight.T
