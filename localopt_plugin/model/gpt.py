"""Megatron-Core GPTModel built from Megatron-style flags, and the forward used by objectives.

The model is Megatron-Core's own ``GPTModel``; the plugin only swaps the layer spec's
``core_attention`` for :class:`SDPAttention`. :func:`forward_hidden` drives the model's own
submodules (embedding, rotary table, decoder) so that a forward can cover any set of absolute
positions (a window after its context) and return the final hidden states that ReCo needs;
:func:`compute_logits` and :func:`token_losses` finish with the model's output layer and its
vocab-parallel cross-entropy.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from localopt_plugin.model.attention import KVMemory, SDPAttention, attention_plan, plan_for
from localopt_plugin.model.init import canonical_parameters, initialize_parameters
from localopt_plugin.platform import cuda_available

log = logging.getLogger(__name__)


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron-LM's padding: a multiple of ``divisible_by x tensor_parallel``."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def transformer_config_from_args(args: argparse.Namespace) -> TransformerConfig:
    params_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        kv_channels=args.kv_channels,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        layernorm_epsilon=args.norm_epsilon,
        normalization=args.normalization,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=not args.disable_bias_linear,
        init_method_std=args.init_method_std,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        use_cpu_initialization=args.use_cpu_initialization or not cuda_available(),
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
    )


def layer_spec(args: argparse.Namespace) -> ModuleSpec:
    """Megatron-Core's local GPT layer spec with SDPA core attention, or TransformerEngine's."""
    if args.transformer_impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
            from megatron.core.models.gpt.gpt_layer_specs import (
                get_gpt_layer_with_transformer_engine_spec,
            )
        except ImportError as err:
            raise SystemExit(f"error: --transformer-impl transformer_engine needs "
                             f"TransformerEngine ({err})") from None
        return get_gpt_layer_with_transformer_engine_spec(normalization=args.normalization)
    spec = get_gpt_layer_local_spec(normalization=args.normalization)
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(
        attention,
        submodules=dataclasses.replace(attention.submodules, core_attention=SDPAttention),
    )
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention)
    )


def build_gpt_model(
    args: argparse.Namespace,
    vocab_size: int,
    pre_process: bool = True,
    post_process: bool = True,
    config: TransformerConfig | None = None,
    vp_stage: int | None = None,
) -> GPTModel:
    """A Megatron-Core GPTModel (or one pipeline stage of it) with layout-independent weights.

    ``vocab_size`` is padded the way Megatron-LM pads it; ``config`` defaults to the one
    derived from the flags (Megatron-LM passes its own).
    """
    if args.sequence_parallel:
        raise SystemExit("error: --sequence-parallel is not supported by the plugin's forward yet")
    config = config or transformer_config_from_args(args)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(args),
        vocab_size=padded_vocab_size(
            vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
        ),
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        parallel_output=True,
        **({"vp_stage": vp_stage} if vp_stage is not None else {}),
    )
    initialize_parameters(canonical_parameters(model), config, args.seed)
    return model.cuda() if cuda_available() else model


def forward_hidden(
    model: GPTModel,
    input_ids: torch.Tensor | None,
    positions: torch.Tensor,
    memory: KVMemory | None = None,
    store: slice | None = None,
) -> torch.Tensor:
    """Final hidden states ``[s, b, h]`` (after the final norm) of tokens at ``positions``.

    input_ids: ``[b, s]``; positions: ``[s]`` absolute positions shared by the batch (need not
    be contiguous). ``memory``/``store``: keys/values of earlier tokens to attend to / to keep
    (see :class:`AttentionPlan`). Without them this is the ordinary causal forward.
    On a pipeline stage of Megatron's own schedule, a stage without the embedding takes its
    input from ``model.set_input_tensor`` and a stage before the last returns un-normed output.
    """
    if input_ids is not None and positions.shape[0] != input_ids.shape[1]:
        raise ValueError(f"{positions.shape[0]} positions for {input_ids.shape[1]} tokens")
    max_positions = model.max_sequence_length
    if int(positions.max()) >= max_positions:
        raise ValueError(f"position {int(positions.max())} exceeds --max-position-embeddings "
                         f"{max_positions}")
    embedded = None
    if model.pre_process:
        embedded = model.embedding(
            input_ids=input_ids, position_ids=positions.unsqueeze(0).expand_as(input_ids))
    rotary = None
    if model.position_embedding_type == "rope":
        rotary = model.rotary_pos_emb(int(positions.max()) + 1)[positions]
    with attention_plan(model, plan_for(positions, memory, store)):
        return model.decoder(hidden_states=embedded, attention_mask=None, rotary_pos_emb=rotary)


def compute_logits(model: GPTModel, hidden: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits ``[s, b, v / tp]`` from final hidden states."""
    weight = model.shared_embedding_or_output_weight() if (
        model.share_embeddings_and_output_weights
    ) else None
    logits, _ = model.output_layer(hidden, weight=weight)
    return logits


def token_losses(model: GPTModel, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy ``[b, s]`` (vocab-parallel under tensor parallelism)."""
    return model.compute_language_model_loss(labels, compute_logits(model, hidden))
