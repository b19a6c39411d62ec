"""Megatron-Core's GPTModel from a :class:`ModelConfig`, and the forward used by objectives.

The model is Megatron-Core's own ``GPTModel``; the plugin only swaps the layer spec's
``core_attention`` for one that runs attention plans (:class:`SDPAttention` in the local spec,
``TEPlannedAttention`` in TransformerEngine's). :func:`forward_hidden` drives the model's own
submodules (embedding, rotary table, decoder) so that a forward can cover any set of absolute
positions (a window after its context) and return the final hidden states that ReCo needs;
:func:`compute_logits` and :func:`token_losses` finish with the model's output layer and its
vocab-parallel cross-entropy.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from localopt_plugin.model.attention import SDPAttention, plan_for
from localopt_plugin.model.config import (
    ModelConfig,
    ParallelConfig,
    padded_vocab_size,
    transformer_config,
)
from localopt_plugin.model.context_parallel import SequenceShard
from localopt_plugin.model.init import canonical_parameters, initialize_parameters
from localopt_plugin.model.kv_memory import KVMemory
from localopt_plugin.model.sequence_parallel import SequenceParallelNorm, padded_rows
from localopt_plugin.platform import cuda_available


def _with_core_attention(spec: ModuleSpec, core_attention: type) -> ModuleSpec:
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(
        attention,
        submodules=dataclasses.replace(attention.submodules, core_attention=core_attention),
    )
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))


def _with_norm(spec: ModuleSpec, norm: type) -> ModuleSpec:
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, input_layernorm=norm, pre_mlp_layernorm=norm))


def layer_spec(config: ModelConfig, sequence_parallel: bool = False) -> ModuleSpec:
    """Megatron-Core's GPT layer spec (local or TransformerEngine) with a core attention that
    runs attention plans (and, in the local spec under sequence parallelism, norms that
    support it)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if config.transformer_impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401  (Megatron's TE classes need it at use)

            from localopt_plugin.model.te_attention import TEPlannedAttention
        except ImportError as err:
            raise ValueError(f"--transformer-impl transformer_engine needs TransformerEngine, "
                             f"which is not importable here ({err}); use --transformer-impl "
                             f"local") from None
        return _with_core_attention(
            gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(), TEPlannedAttention)
    spec = _with_core_attention(
        gpt_layer_specs.get_gpt_layer_local_spec(normalization=config.normalization),
        SDPAttention)
    return _with_norm(spec, SequenceParallelNorm) if sequence_parallel else spec


def build_gpt_model(
    config: ModelConfig,
    vocab_size: int,
    *,
    parallel: ParallelConfig | None = None,
    seed: int = 1234,
    pre_process: bool = True,
    post_process: bool = True,
    megatron_config: TransformerConfig | None = None,
    vp_stage: int | None = None,
) -> GPTModel:
    """A Megatron-Core GPTModel (or one pipeline stage of it) with layout-independent weights.

    ``vocab_size`` is padded the way Megatron-LM pads it; ``megatron_config`` defaults to the
    one derived from ``config`` (Megatron-LM passes its own).
    """
    parallel = parallel or ParallelConfig()
    parallel.check_model(config)  # e.g. heads that do not split over TP x CP, CP with TE
    if config.max_position_embeddings is None:
        raise ValueError("ModelConfig.max_position_embeddings is unset (resolve it from the "
                         "data's sequence length first)")
    megatron_config = megatron_config or transformer_config(config, parallel)
    spec = layer_spec(config, megatron_config.sequence_parallel)
    if megatron_config.sequence_parallel:  # the final norm too; this stage's layers
        layers = get_num_layers_to_build(megatron_config, vp_stage=vp_stage)
        spec = TransformerBlockSubmodules(layer_specs=[spec] * layers,
                                          layer_norm=SequenceParallelNorm)
    model = GPTModel(
        config=megatron_config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(vocab_size, config.make_vocab_size_divisible_by,
                                     parallel.tensor_model_parallel_size),
        max_sequence_length=config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not config.untie_embeddings_and_output_weights,
        position_embedding_type=config.position_embedding_type,
        rotary_percent=config.rotary_percent,
        rotary_base=config.rotary_base,
        parallel_output=True,
        **({"vp_stage": vp_stage} if vp_stage is not None else {}),
    )
    initialize_parameters(canonical_parameters(model), megatron_config, seed)
    return model.cuda() if cuda_available() else model


def forward_hidden(
    model: GPTModel,
    input_ids: torch.Tensor | None,
    positions: torch.Tensor,
    memory: KVMemory | None = None,
    store_from: int | None = None,
    shard: SequenceShard | None = None,
    windows: tuple[tuple[int, int], ...] = (),
) -> torch.Tensor:
    """Final hidden states ``[s, b, h]`` (after the final norm) of tokens at ``positions``.

    input_ids: ``[b, s]``; positions: ``[s]`` absolute positions shared by the batch (see
    :func:`~localopt_plugin.model.attention.plan_for` for what may follow a gap).
    ``memory``/``store_from``: keys/values of earlier tokens to attend to / this forward's
    tokens to keep from ``store_from`` on. Without them this is the ordinary causal forward.
    ``windows``: the tokens after the head are several windows, each attending to the kept
    context before its start and to itself (see :class:`~localopt_plugin.model.attention.
    AttentionPlan`).
    ``shard``: under context parallelism, this rank's slice of the tokens: the forward runs and
    returns only those rows (``input_ids`` and ``positions`` are still the whole forward's).
    Under sequence parallelism the forward (this context-parallel rank's rows of it, under both)
    is padded to a multiple of the TP size and returns this TP rank's even slice of them.
    On a pipeline stage of Megatron's own schedule, a stage without the embedding takes its
    input from ``model.set_input_tensor`` and a stage before the last returns un-normed output.
    """
    if input_ids is not None and positions.shape[0] != input_ids.shape[1]:
        raise ValueError(f"{positions.shape[0]} positions for {input_ids.shape[1]} tokens")
    max_positions = model.max_sequence_length
    if int(positions.max()) >= max_positions:
        raise ValueError(f"position {int(positions.max())} exceeds --max-position-embeddings "
                         f"{max_positions}")
    plan = plan_for(positions, memory, store_from, shard, windows)
    if shard is not None:
        if shard.total != len(positions):
            raise ValueError(f"a shard of {shard.total} rows for {len(positions)} positions")
        positions = shard.local(positions)
        input_ids = None if input_ids is None else shard.local(input_ids, dim=1)
    pad = padded_rows(model, len(positions))
    if pad:  # sequence parallelism splits evenly over TP ranks: pad the end (see its module)
        positions = torch.cat([positions, positions[-1:].expand(pad)])
        if input_ids is not None:
            input_ids = torch.cat([input_ids, input_ids[:, -1:].expand(-1, pad)], dim=1)
        if plan is not None:
            plan = dataclasses.replace(plan, padding=pad)
    embedded = None
    if model.pre_process:
        embedded = model.embedding(
            input_ids=input_ids, position_ids=positions.unsqueeze(0).expand_as(input_ids))
    rotary = None
    if model.position_embedding_type == "rope":
        # packed_seq: the whole table, not Megatron's own per-CP-rank slice of it
        rotary = model.rotary_pos_emb(int(positions.max()) + 1, packed_seq=True)[positions]
    return model.decoder(hidden_states=embedded, attention_mask=None, rotary_pos_emb=rotary,
                         packed_seq_params=plan)


@contextlib.contextmanager
def final_norm_input(model: GPTModel) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``captured["hidden"]`` is the input of the decoder's final norm (the
    residual stream ``[s, b, h]``) of the latest forward: what ReCo's ``pre-norm`` form acts
    on. Nothing is captured on a model without a final norm (a pipeline stage before the last).
    Free: autograd keeps that tensor for the norm's backward anyway."""
    captured: dict[str, torch.Tensor] = {}
    norm = getattr(model.decoder, "final_layernorm", None)
    handle = None if norm is None else norm.register_forward_hook(
        lambda module, args, output: captured.__setitem__("hidden", args[0]))
    try:
        yield captured
    finally:
        if handle is not None:
            handle.remove()


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
