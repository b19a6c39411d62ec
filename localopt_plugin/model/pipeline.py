"""Pipeline parallelism: a DeepSpeed PipelineModule built from Megatron-Core modules.

Stages are Megatron's own ``LanguageModelEmbedding``, ``TransformerLayer`` (from the same layer
spec as the non-pipelined model), the final norm and the output layer (tied to the embedding
through DeepSpeed's ``TiedLayerSpec`` when embeddings are shared). Parameters keep GPTModel's
names (:meth:`canonical_parameters`), so initialisation and checkpoints match a GPTModel.

Every stage executes :class:`~localopt_plugin.objectives.sequence.ForwardPlan` s. What crosses
stages is ``(hidden, context_bits, positions, context_length, keep_from)``: the autograd
stream, and the Local Opt. context stream bit-cast to an integer dtype. DeepSpeed sends no
gradient for integer tensors, so the context crosses stages without autograd and without any
gradient traffic. Each layer runs the context under ``no_grad`` keeping its keys/values, then
the window attending to them, which is the same computation as the two whole-model passes.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from localopt_plugin.model.attention import AttentionPlan, KVMemory, attention_plan, plan_for
from localopt_plugin.model.gpt import layer_spec, padded_vocab_size, transformer_config_from_args
from localopt_plugin.model.init import initialize_parameters
from localopt_plugin.objectives.base import ObjectiveOutput
from localopt_plugin.objectives.sequence import ForwardPlan
from localopt_plugin.regularizers import apply_regularizers

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


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

    def __init__(self, args: argparse.Namespace, vocab_size: int) -> None:
        super().__init__()
        config = transformer_config_from_args(args)
        padded = padded_vocab_size(vocab_size, args.make_vocab_size_divisible_by,
                                   args.tensor_model_parallel_size)
        self.embedding = LanguageModelEmbedding(
            config, padded, args.max_position_embeddings,
            position_embedding_type=args.position_embedding_type)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, padded, config=config, init_method=config.init_method,
            bias=False, gather_output=False, skip_weight_param_allocation=True)
        self.dtype = config.params_dtype

    def forward(self, inputs):
        context_ids, ids, positions, context_length, keep_from = inputs
        hidden = self.embedding(input_ids=ids, position_ids=positions.expand_as(ids))
        n = int(context_length)
        if n:
            with torch.no_grad():
                context = self.embedding(
                    input_ids=context_ids[:, :n],
                    position_ids=torch.arange(n, device=ids.device).expand(ids.shape[0], n))
        else:  # a one-row placeholder: p2p messages cannot be empty
            context = hidden.new_zeros((1, *hidden.shape[1:]))
        return hidden, context.view(_BITS[self.dtype]), positions, context_length, keep_from

    def logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = self.output_layer(hidden, weight=self.embedding.word_embeddings.weight)
        return logits, hidden


def _tied_logits(module: EmbeddingStage, hidden: torch.Tensor):
    return module.logits(hidden)


class TransformerLayerStage(_Stage):
    """One Megatron-Core TransformerLayer applied to the context and autograd streams."""

    def __init__(self, args: argparse.Namespace, index: int) -> None:
        super().__init__()
        config = transformer_config_from_args(args)
        spec = layer_spec(args)
        # Megatron adds this stage's offset to layer_number; we want the global number.
        offset = get_transformer_layer_offset(config)
        self.layer = build_module(spec, config=config, layer_number=index + 1 - offset)
        self.canonical_prefix = f"decoder.layers.{index}."
        self.rotary = None
        if args.position_embedding_type == "rope":
            self.rotary = RotaryEmbedding(
                kv_channels=config.kv_channels, rotary_percent=args.rotary_percent,
                rotary_base=args.rotary_base, use_cpu_initialization=True)
        self.dtype = config.params_dtype

    def canonical_parameters(self):
        for name, param in self.layer.named_parameters():
            yield self.canonical_prefix + name, param

    def _run(self, hidden, positions, plan):
        rotary = None
        if self.rotary is not None:
            rotary = self.rotary(int(positions.max()) + 1)[positions]
        with attention_plan(self.layer, plan):
            return self.layer(hidden_states=hidden, attention_mask=None,
                              rotary_pos_emb=rotary)[0]

    def forward(self, inputs):
        hidden, context_bits, positions, context_length, keep_from = inputs
        n = int(context_length)
        memory = None
        if n:
            memory = KVMemory()
            context_positions = torch.arange(n, device=hidden.device)
            with torch.no_grad():
                context = self._run(
                    context_bits.view(self.dtype), context_positions,
                    AttentionPlan(context_positions, memory, slice(int(keep_from), None)))
            context_bits = context.view(_BITS[self.dtype])
        hidden = self._run(hidden, positions, plan_for(positions, memory))
        return hidden, context_bits, positions, context_length, keep_from


class FinalNormStage(_Stage):
    canonical_prefix = "decoder.final_layernorm."

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        config = transformer_config_from_args(args)
        norm = layer_spec(args).submodules.input_layernorm
        self.norm = build_module(norm, config=config, hidden_size=config.hidden_size,
                                 eps=config.layernorm_epsilon)

    def canonical_parameters(self):
        for name, param in self.norm.named_parameters():
            yield self.canonical_prefix + name, param

    def forward(self, inputs):
        return self.norm(inputs[0])


class OutputStage(_Stage):
    """Untied output layer: vocab-parallel logits."""

    canonical_prefix = ""

    def __init__(self, args: argparse.Namespace, vocab_size: int) -> None:
        super().__init__()
        config = transformer_config_from_args(args)
        padded = padded_vocab_size(vocab_size, args.make_vocab_size_divisible_by,
                                   args.tensor_model_parallel_size)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, padded, config=config, init_method=config.init_method,
            bias=False, gather_output=False)

    def forward(self, hidden):
        logits, _ = self.output_layer(hidden)
        return logits, hidden


class PipelineLoss:
    """loss_fn of the PipelineModule: cross-entropy on the optimized rows, plus regularizers.

    Metrics of each micro-batch are kept in ``metrics`` for the trainer to collect.
    """

    def __init__(self, regularizers=()) -> None:
        self.regularizers = list(regularizers)
        self.iteration = 0
        self.evaluating = False
        self.metrics: list[dict[str, float]] = []

    def __call__(self, outputs, labels):
        logits, hidden = outputs
        target, meta = labels
        loss_from, first_frame, num_frames = (int(x) for x in meta)
        losses = tensor_parallel.vocab_parallel_cross_entropy(
            logits[loss_from:].float(), target.t().contiguous())
        lm_loss = losses.mean()
        if self.evaluating:
            return lm_loss
        out = ObjectiveOutput(lm_loss, hidden[loss_from:], target.numel(), first_frame,
                              num_frames)
        total, reg_metrics = apply_regularizers(out, self.regularizers, self.iteration)
        metrics = {"lm loss": lm_loss.detach(), **reg_metrics, "total loss": total.detach()}
        self.metrics.append({k: float(v) for k, v in metrics.items()})
        return total


def plan_to_pipe(plan: ForwardPlan):
    """A ForwardPlan as the (first-stage inputs, last-stage labels) tuple DeepSpeed loads."""
    ids = plan.ids
    if plan.context_ids is not None:
        context_ids, n = plan.context_ids, plan.context_ids.shape[1]
    else:
        context_ids, n = ids[:, :1], 0
    scalar = lambda v: torch.tensor([v], dtype=torch.long)  # noqa: E731
    inputs = (context_ids, ids, plan.positions, scalar(n), scalar(plan.context_keep_from))
    meta = torch.tensor([plan.loss_from, plan.first_frame, plan.num_frames], dtype=torch.long)
    return inputs, (plan.labels, meta)


def build_pipeline_model(args: argparse.Namespace, vocab_size: int,
                         regularizers=()) -> PipelineModule:
    """The GPT as a DeepSpeed PipelineModule over Megatron's parallel layout."""
    tied = not args.untie_embeddings_and_output_weights
    layers = [TiedLayerSpec("embedding", EmbeddingStage, args, vocab_size,
                            tied_weight_attr="embedding.word_embeddings.weight")
              if tied else LayerSpec(EmbeddingStage, args, vocab_size)]
    layers += [LayerSpec(TransformerLayerStage, args, i) for i in range(args.num_layers)]
    layers.append(LayerSpec(FinalNormStage, args))
    layers.append(TiedLayerSpec("embedding", EmbeddingStage, args, vocab_size,
                                forward_fn=_tied_logits,
                                tied_weight_attr="embedding.word_embeddings.weight")
                  if tied else LayerSpec(OutputStage, args, vocab_size))
    topology = PipeModelDataParallelTopology(
        num_pp=parallel_state.get_pipeline_model_parallel_world_size(),
        num_mp=parallel_state.get_tensor_model_parallel_world_size(),
        num_dp=parallel_state.get_data_parallel_world_size())
    module = PipelineModule(layers=layers, loss_fn=PipelineLoss(regularizers),
                            topology=topology, partition_method="type:TransformerLayerStage",
                            dynamic_shape=True)
    config = transformer_config_from_args(args)
    named = [p for m in module.modules() if isinstance(m, _Stage)
             for p in m.canonical_parameters()]
    initialize_parameters(named, config, args.seed)
    return module
