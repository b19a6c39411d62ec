"""The model: Megatron-Core's GPTModel with a core attention that runs attention plans.

* :mod:`.config`: ``ModelConfig``/``ParallelConfig`` (Megatron-LM flags) -> TransformerConfig;
* :mod:`.gpt`: the GPTModel and the forward objectives use;
* :mod:`.attention`, :mod:`.kv_memory`: attention plans, kept keys/values, mask-free kernels;
* :mod:`.init`: layout-independent initialisation; :mod:`.pipeline`: pipeline stages.

Nothing here imports from the layers above (plans, objectives, training).
"""

from localopt_plugin.model.attention import (
    AttentionPlan,
    SDPAttention,
    context_memory,
    plan_for,
)
from localopt_plugin.model.config import (
    ModelConfig,
    ParallelConfig,
    padded_vocab_size,
    transformer_config,
)
from localopt_plugin.model.gpt import (
    build_gpt_model,
    compute_logits,
    final_norm_input,
    forward_hidden,
    layer_spec,
    token_losses,
)
from localopt_plugin.model.kv_memory import KVMemory

__all__ = [
    "AttentionPlan",
    "KVMemory",
    "ModelConfig",
    "ParallelConfig",
    "SDPAttention",
    "build_gpt_model",
    "compute_logits",
    "context_memory",
    "final_norm_input",
    "forward_hidden",
    "layer_spec",
    "padded_vocab_size",
    "plan_for",
    "token_losses",
    "transformer_config",
]
