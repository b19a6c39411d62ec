"""TransformerEngine core attention that runs :class:`AttentionPlan` s (needs TE and a GPU).

Megatron-Core's ``TEDotProductAttention`` with the plan logic of :mod:`.attention`: head queries
attend causally to the head; tail queries attend to every key in position order with
TransformerEngine's ``causal_bottom_right`` mask type, which its fused (flash/cuDNN) kernels
implement without a mask tensor. Importing this module imports TransformerEngine.
"""

from __future__ import annotations

import torch
from megatron.core.extensions.transformer_engine import TEDotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from localopt_plugin.model.attention import AttentionPlan, split_by_plan


class TEPlannedAttention(TEDotProductAttention):
    """``TEDotProductAttention`` that also executes attention plans."""

    ordered_keys = True  # one fused call over every key: the memory keeps rows for them all

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **kwargs) -> torch.Tensor:
        if not isinstance(packed_seq_params, AttentionPlan):
            return super().forward(query, key, value, attention_mask,
                                   attn_mask_type=attn_mask_type or AttnMaskType.causal,
                                   attention_bias=attention_bias,
                                   packed_seq_params=packed_seq_params, **kwargs)
        head, windows = split_by_plan(self.layer_number, key, value, packed_seq_params)
        parts = []
        if head:
            parts.append(super().forward(query[:head], key[:head], value[:head], None,
                                         attn_mask_type=AttnMaskType.causal))
        offset = head
        for window in windows:
            k, v = window.ordered()
            parts.append(super().forward(query[offset:offset + window.length()], k, v, None,
                                         attn_mask_type=AttnMaskType.causal_bottom_right))
            offset += window.length()
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
