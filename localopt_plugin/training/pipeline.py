"""Local Optimization through DeepSpeed's pipeline engine: the loss stage and the plan feed.

The stages themselves are Megatron-Core modules (:mod:`localopt_plugin.model.pipeline`); here
the :class:`~deepspeed.pipe.PipelineModule` is assembled with the loss function that applies
the objective's cross-entropy and the regularizers on the last stage, and each
:class:`~localopt_plugin.plan.ForwardPlan` becomes the tuple DeepSpeed feeds the first stage.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state, tensor_parallel

from localopt_plugin.model import ModelConfig, ParallelConfig, transformer_config
from localopt_plugin.model.init import initialize_parameters
from localopt_plugin.model.pipeline import pipeline_layers, stage_parameters, windows_to_pipe
from localopt_plugin.plan import ForwardPlan, objective_output
from localopt_plugin.regularizers import apply_regularizers


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
        logits, hidden, pre_norm = outputs
        target, meta = labels
        loss_from, first_frame, num_frames, windows = (int(x) for x in meta)
        losses = tensor_parallel.vocab_parallel_cross_entropy(
            logits[loss_from:].float(), target.t().contiguous())
        if self.evaluating:
            return losses.mean()
        out = objective_output(losses, hidden[loss_from:], pre_norm[loss_from:], first_frame,
                               num_frames, windows=windows)
        total, metrics = apply_regularizers(out, self.regularizers, self.iteration)
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
    inputs = (context_ids, ids, plan.positions, scalar(n), scalar(plan.context_keep_from),
              windows_to_pipe(plan.windows))
    meta = torch.tensor([plan.loss_from, plan.first_frame, plan.num_frames, plan.window_count],
                        dtype=torch.long)
    return inputs, (plan.labels, meta)


def build_pipeline_module(model: ModelConfig, parallel: ParallelConfig, vocab_size: int,
                          seed: int, regularizers=()) -> PipelineModule:
    """The GPT as a DeepSpeed PipelineModule over Megatron's parallel layout, with the
    single-process model's initial weights. Full recomputation (``--recompute-granularity full
    --recompute-method uniform --recompute-num-layers N``) is DeepSpeed's pipeline activation
    checkpointing: each stage's modules in chunks of N, a chunk of transformer layers only
    recomputed in backward (a chunk with the embedding or the final norm is kept)."""
    topology = PipeModelDataParallelTopology(
        num_pp=parallel_state.get_pipeline_model_parallel_world_size(),
        num_mp=parallel_state.get_tensor_model_parallel_world_size(),
        num_dp=parallel_state.get_data_parallel_world_size())
    interval = model.recompute_num_layers if model.recompute_granularity == "full" else 0
    module = PipelineModule(layers=pipeline_layers(model, parallel, vocab_size),
                            loss_fn=PipelineLoss(regularizers), topology=topology,
                            partition_method="type:TransformerLayerStage", dynamic_shape=True,
                            activation_checkpoint_interval=interval,
                            checkpointable_layers=["TransformerLayerStage"])
    initialize_parameters(stage_parameters(module), transformer_config(model, parallel), seed)
    return module
