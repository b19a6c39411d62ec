"""An independent plain-PyTorch GPT forward over a Megatron-Core GPTModel's weights.

Used as the reference for Local Optimization: ``detach_kv`` marks positions whose keys and
values are detached in every layer (the context), which is what Local Opt. computes without
running those positions under autograd. Supports the configuration of ``tiny_args``:
pre-LayerNorm, GELU MLP with biases, learned absolute positions, tied embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_hidden(model, ids: torch.Tensor, detach_kv: torch.Tensor | None = None,
                     ) -> torch.Tensor:
    """Final (normed) hidden states ``[b, s, h]`` of a causal forward over ``ids`` ``[b, s]``."""
    p = dict(model.named_parameters())
    cfg = model.config
    heads, dim = cfg.num_attention_heads, cfg.kv_channels
    eps = cfg.layernorm_epsilon
    b, s = ids.shape
    pos = torch.arange(s)
    x = p["embedding.word_embeddings.weight"][ids] + p["embedding.position_embeddings.weight"][pos]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(cfg.num_layers):
        pre = f"decoder.layers.{i}."

        def ln(t, name, pre=pre):
            return F.layer_norm(t, (t.shape[-1],), p[pre + name + ".weight"],
                                p[pre + name + ".bias"], eps)

        qkv = F.linear(ln(x, "input_layernorm"), p[pre + "self_attention.linear_qkv.weight"],
                       p[pre + "self_attention.linear_qkv.bias"])
        # Megatron's fused layout per head (groups == heads): [q | k | v] of head_dim each
        q, k, v = qkv.view(b, s, heads, 3 * dim).split(dim, dim=-1)
        if detach_kv is not None:
            keep = (~detach_kv).view(1, s, 1, 1).to(k.dtype)
            k = k * keep + k.detach() * (1 - keep)
            v = v * keep + v.detach() * (1 - keep)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / dim**0.5
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, heads * dim)
        x = x + F.linear(attn, p[pre + "self_attention.linear_proj.weight"],
                         p[pre + "self_attention.linear_proj.bias"])
        h = F.linear(ln(x, "pre_mlp_layernorm"), p[pre + "mlp.linear_fc1.weight"],
                     p[pre + "mlp.linear_fc1.bias"])
        x = x + F.linear(F.gelu(h), p[pre + "mlp.linear_fc2.weight"],
                         p[pre + "mlp.linear_fc2.bias"])
    return F.layer_norm(x, (x.shape[-1],), p["decoder.final_layernorm.weight"],
                        p["decoder.final_layernorm.bias"], eps)


def reference_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    return hidden @ model.embedding.word_embeddings.weight.T
