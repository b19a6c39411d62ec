"""Core attention for the local layer spec: SDPA, plus keys/values carried across forwards.

``SDPAttention`` replaces Megatron-Core's ``DotProductAttention`` as the ``core_attention``
submodule (same constructor and forward contract), so the rest of Megatron's transformer layer
is used as is. Without a plan it is plain causal attention through
``torch.nn.functional.scaled_dot_product_attention``, which never materialises the score matrix
on the fused paths.

An :class:`AttentionPlan` lets one forward attend to keys/values kept from an earlier forward:
  * Local Optimization runs the context frames under ``no_grad`` storing their keys/values in a
    :class:`KVMemory`, then runs the window attending to them (no graph through the context);
  * generation keeps a KV cache the same way.
Tokens are identified by absolute positions, so keys from memory and from the current forward
need not be contiguous; the mask is simply ``key_position <= query_position``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


@dataclass
class KVMemory:
    """Per-layer keys/values (``[s, b, groups, head_dim]``) and their absolute positions."""

    layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        return self.layers.get(layer)

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor) -> None:
        key, value = key.detach(), value.detach()
        old = self.layers.get(layer)
        if old is not None:
            key = torch.cat([old[0], key])
            value = torch.cat([old[1], value])
            pos = torch.cat([old[2], pos])
        self.layers[layer] = (key, value, pos)

    def num_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v, _ in self.layers.values())


@dataclass
class AttentionPlan:
    """What every attention layer does in one forward.

    positions: absolute positions of this forward's tokens, ``[s]`` (shared by the batch).
    memory: keys/values of earlier tokens to attend to (and/or to store into).
    store: which of this forward's tokens to append to ``memory`` (detached), e.g. a slice.
    """

    positions: torch.Tensor
    memory: KVMemory | None = None
    store: slice | None = None


def plan_for(positions: torch.Tensor, memory: KVMemory | None = None,
             store: slice | None = None) -> AttentionPlan | None:
    """The plan a forward needs, or None when plain causal attention computes the same:
    no keys/values to attend to or keep, and contiguous positions."""
    if memory is None and store is None and bool((positions.diff() == 1).all()):
        return None
    return AttentionPlan(positions=positions, memory=memory, store=store)


class SDPAttention(MegatronModule):
    """Drop-in ``core_attention`` submodule using scaled_dot_product_attention."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **_unused,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError("SDPAttention supports only the vanilla softmax")
        tp = pg_collection.tp.size() if pg_collection is not None else (
            parallel_state.get_tensor_model_parallel_world_size()
        )
        self.layer_number = max(1, layer_number)
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups or config.num_attention_heads, tp)
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        self.plan: AttentionPlan | None = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        seq_q, batch = query.shape[0], query.shape[1]
        mask, is_causal = None, True
        plan = self.plan
        if plan is not None:
            key_pos = plan.positions
            memory = plan.memory.get(self.layer_number) if plan.memory is not None else None
            if plan.store is not None:
                stored = plan.store
                plan.memory.append(self.layer_number, key[stored], value[stored],
                                   plan.positions[stored])
            if memory is not None:
                key = torch.cat([memory[0], key])
                value = torch.cat([memory[1], value])
                key_pos = torch.cat([memory[2], key_pos])
            mask = key_pos[None, :] <= plan.positions[:, None]  # True = may attend
            is_causal = False
        elif attention_mask is not None:
            mask, is_causal = ~attention_mask, False  # Megatron's masks are True where masked out

        if self.groups != self.heads:
            repeat = self.heads // self.groups
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)
        # [s, b, heads, dim] -> [b, heads, s, dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        rng = contextlib.nullcontext()
        if dropout_p > 0 and not self.config.sequence_parallel:
            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.softmax_scale,
            )
        # [b, heads, s, dim] -> [s, b, heads * dim]
        return out.permute(2, 0, 1, 3).reshape(seq_q, batch, -1)


@contextlib.contextmanager
def attention_plan(model: torch.nn.Module, plan: AttentionPlan | None) -> Iterator[None]:
    """Give every SDPAttention of ``model`` the same plan for the duration of one forward."""
    layers = getattr(model, "_sdpa_layers", None)
    if layers is None:
        layers = [m for m in model.modules() if isinstance(m, SDPAttention)]
        model._sdpa_layers = layers
    if plan is not None and not layers:
        raise RuntimeError("attention plans need the SDPAttention core attention (local spec)")
    for layer in layers:
        layer.plan = plan
    try:
        yield
    finally:
        for layer in layers:
            layer.plan = None
