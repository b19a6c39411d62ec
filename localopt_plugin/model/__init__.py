"""The model: Megatron-Core's GPTModel with an SDPA core attention that can carry keys/values."""

from localopt_plugin.model.attention import AttentionPlan, KVMemory, SDPAttention, attention_plan
from localopt_plugin.model.gpt import (
    build_gpt_model,
    compute_logits,
    forward_hidden,
    layer_spec,
    padded_vocab_size,
    token_losses,
    transformer_config_from_args,
)

__all__ = [
    "AttentionPlan",
    "KVMemory",
    "SDPAttention",
    "attention_plan",
    "build_gpt_model",
    "compute_logits",
    "forward_hidden",
    "layer_spec",
    "padded_vocab_size",
    "token_losses",
    "transformer_config_from_args",
]
