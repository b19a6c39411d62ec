"""Pipeline stages for a DeepSpeed PipelineModule, built from Megatron-Core modules.

Stages are Megatron's own ``LanguageModelEmbedding``, ``TransformerLayer`` (from the same layer
spec as the non-pipelined model), the final norm and the output layer (tied to the embedding
through DeepSpeed's ``TiedLayerSpec`` when embeddings are shared). Parameters keep GPTModel's
names (:meth:`canonical_parameters`), so initialisation and checkpoints match a GPTModel.

Every stage executes :class:`~localopt_plugin.plan.ForwardPlan` s. What crosses
stages is ``(hidden, context_bits, positions, context_length, keep_from, windows)``: the
autograd stream, the Local Opt. context stream bit-cast to an integer dtype, and the plan's
windows (:func:`windows_to_pipe`). DeepSpeed sends no
gradient for integer tensors, so the context crosses stages without autograd and without any
gradient traffic. Each layer runs the context under ``no_grad`` keeping its keys/values, then
the window attending to them, which is the same computation as the two whole-model passes.
The module with its loss function is assembled by ``localopt_plugin.training.pipeline``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from localopt_plugin.model.attention import context_memory, plan_for
from localopt_plugin.model.config import (
    ModelConfig,
    ParallelConfig,
    padded_vocab_size,
    transformer_config,
)
from localopt_plugin.model.gpt import layer_spec

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def windows_to_pipe(windows: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """A plan's windows (several per context pass) as a ``[n, 2]`` tensor that crosses stages;
    ``[[-1, 0]]`` for none (p2p messages cannot be empty)."""
    return torch.tensor(windows or ((-1, 0),), dtype=torch.long)


def windows_from_pipe(tensor: torch.Tensor) -> tuple[tuple[int, int], ...]:
    windows = tuple((int(start), int(length)) for start, length in tensor.tolist())
    return () if windows == ((-1, 0),) else windows


class _Stage(torch.nn.Module):
    """Shared plumbing: the config and GPTModel names of this stage's parameters."""

    canonical_prefix = ""

    def canonical_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for name, param in self.named_parameters():
            yield self.canonical_prefix + name, param


class EmbeddingStage(_Stage):
    """First stage: token (+ learned position) embeddings of both streams.

    On the last stage (tied embeddings) the same module computes the logits with the shared
    word-embedding weight (``logits``).
    """

    def __init__(self, model: ModelConfig, parallel: ParallelConfig, vocab_size: int) -> None:
        super().__init__()
        config = transformer_config(model, parallel)
        padded = padded_vocab_size(vocab_size, model.make_vocab_size_divisible_by,
                                   parallel.tensor_model_parallel_size)
        self.embedding = LanguageModelEmbedding(
            config, padded, model.max_position_embeddings,
            position_embedding_type=model.position_embedding_type)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, padded, config=config, init_method=config.init_method,
            bias=False, gather_output=False, skip_weight_param_allocation=True)
        self.dtype = config.params_dtype

    def forward(self, inputs):
        context_ids, ids, positions, context_length, keep_from, windows = inputs
        hidden = self.embedding(input_ids=ids, position_ids=positions.expand_as(ids))
        n = int(context_length)
        if n:
            with torch.no_grad():
                context = self.embedding(
                    input_ids=context_ids[:, :n],
                    position_ids=torch.arange(n, device=ids.device).expand(ids.shape[0], n))
        else:  # a one-row placeholder: p2p messages cannot be empty
            context = hidden.new_zeros((1, *hidden.shape[1:]))
        return (hidden, context.view(_BITS[self.dtype]), positions, context_length, keep_from,
                windows)

    def logits(self, streams: tuple[torch.Tensor, torch.Tensor]):
        hidden, pre_norm = streams
        logits, _ = self.output_layer(hidden, weight=self.embedding.word_embeddings.weight)
        return logits, hidden, pre_norm


def _tied_logits(module: EmbeddingStage, streams: tuple[torch.Tensor, torch.Tensor]):
    return module.logits(streams)


class TransformerLayerStage(_Stage):
    """One Megatron-Core TransformerLayer applied to the context and autograd streams."""

    def __init__(self, model: ModelConfig, parallel: ParallelConfig, index: int) -> None:
        super().__init__()
        config = transformer_config(model, parallel)
        spec = layer_spec(model)
        # Megatron adds this stage's offset to layer_number; we want the global number.
        offset = get_transformer_layer_offset(config)
        self.layer = build_module(spec, config=config, layer_number=index + 1 - offset)
        self.canonical_prefix = f"decoder.layers.{index}."
        self.rotary = None
        if model.position_embedding_type == "rope":
            self.rotary = RotaryEmbedding(
                kv_channels=config.kv_channels, rotary_percent=model.rotary_percent,
                rotary_base=model.rotary_base, use_cpu_initialization=True)
        self.dtype = config.params_dtype

    def canonical_parameters(self):
        for name, param in self.layer.named_parameters():
            yield self.canonical_prefix + name, param

    def _run(self, hidden, positions, plan):
        rotary = None
        if self.rotary is not None:
            rotary = self.rotary(int(positions.max()) + 1)[positions]
        return self.layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary,
                          packed_seq_params=plan)[0]

    def forward(self, inputs):
        hidden, context_bits, positions, context_length, keep_from, windows = inputs
        n, kept_from = int(context_length), int(keep_from)
        memory = None
        if n:
            memory = context_memory(self.layer, kept_from, n, int(positions.max()) + 1)
            context_positions = torch.arange(n, device=hidden.device)
            with torch.no_grad():
                context = self._run(context_bits.view(self.dtype), context_positions,
                                    plan_for(context_positions, memory, kept_from))
            context_bits = context.view(_BITS[self.dtype])
        hidden = self._run(hidden, positions,
                           plan_for(positions, memory, windows=windows_from_pipe(windows)))
        return hidden, context_bits, positions, context_length, keep_from, windows


class FinalNormStage(_Stage):
    """The final norm; its input (the residual stream) goes on with its output, for ReCo's
    ``pre-norm`` form (free: the norm's backward keeps that tensor anyway)."""

    canonical_prefix = "decoder.final_layernorm."

    def __init__(self, model: ModelConfig, parallel: ParallelConfig) -> None:
        super().__init__()
        config = transformer_config(model, parallel)
        norm = layer_spec(model).submodules.input_layernorm
        self.norm = build_module(norm, config=config, hidden_size=config.hidden_size,
                                 eps=config.layernorm_epsilon)

    def canonical_parameters(self):
        for name, param in self.norm.named_parameters():
            yield self.canonical_prefix + name, param

    def forward(self, inputs):
        return self.norm(inputs[0]), inputs[0]


class OutputStage(_Stage):
    """Untied output layer: vocab-parallel logits."""

    canonical_prefix = ""

    def __init__(self, model: ModelConfig, parallel: ParallelConfig, vocab_size: int) -> None:
        super().__init__()
        config = transformer_config(model, parallel)
        padded = padded_vocab_size(vocab_size, model.make_vocab_size_divisible_by,
                                   parallel.tensor_model_parallel_size)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, padded, config=config, init_method=config.init_method,
            bias=False, gather_output=False)

    def forward(self, streams):
        hidden, pre_norm = streams
        logits, _ = self.output_layer(hidden)
        return logits, hidden, pre_norm


def pipeline_layers(model: ModelConfig, parallel: ParallelConfig, vocab_size: int) -> list:
    """The GPT as DeepSpeed layer specs: embedding, layers, final norm, output (tied to the
    embedding when embeddings are shared)."""
    tied = not model.untie_embeddings_and_output_weights
    weight = "embedding.word_embeddings.weight"
    layers = [TiedLayerSpec("embedding", EmbeddingStage, model, parallel, vocab_size,
                            tied_weight_attr=weight)
              if tied else LayerSpec(EmbeddingStage, model, parallel, vocab_size)]
    layers += [LayerSpec(TransformerLayerStage, model, parallel, i)
               for i in range(model.num_layers)]
    layers.append(LayerSpec(FinalNormStage, model, parallel))
    layers.append(TiedLayerSpec("embedding", EmbeddingStage, model, parallel, vocab_size,
                                forward_fn=_tied_logits, tied_weight_attr=weight)
                  if tied else LayerSpec(OutputStage, model, parallel, vocab_size))
    return layers


def stage_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Every stage parameter of ``module`` under its GPTModel name."""
    return [p for m in module.modules() if isinstance(m, _Stage) for p in m.canonical_parameters()]
