"""Local Optimization through DeepSpeed's pipeline engine, on the shared plan functions.

Each pipeline stage is one DeepSpeed layer: Megatron-Core's GPTModel built for that stage
(embedding on the first, final norm and output layer on the last; ``build_gpt_model`` as
Megatron-LM's ``pretrain()`` builds its stages), whose forward is
:func:`~localopt_plugin.plan.plan_hidden`, the function ``pretrain()``'s stages run: the
context pass without autograd, then the autograd pass, both streams in one tensor between
stages (the context rows carry zero gradient back). The last stage's loss function assembles
the objective's output with :func:`~localopt_plugin.plan.plan_output` from the micro-batch's
own plan, as every executor does. So a window, its context and ReCo's states are computed in
one place whatever the executor.

What crosses stages: ``(rows, context_length, keep_from, positions, windows)``; the first stage
gets ``(context_ids, ids, ...)`` from the plan feed instead of ``rows``. The tied word embedding
(first stage) and output weight (last stage) get their gradients summed over Megatron's
embedding group, where DeepSpeed reduces tied weights (``get_tied_weights_and_groups``).
"""

from __future__ import annotations

import glob
import os
from collections import deque

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state

from localopt_plugin.errors import UserError
from localopt_plugin.model import ModelConfig, ParallelConfig, build_gpt_model, final_norm_input
from localopt_plugin.model.init import canonical_parameters
from localopt_plugin.plan import ForwardPlan, plan_hidden, plan_output
from localopt_plugin.regularizers import apply_regularizers


def _scalar(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.long)


def _windows(plan: ForwardPlan) -> torch.Tensor:
    """The plan's windows as a ``[n, 2]`` tensor; ``[[-1, 0]]`` for none (p2p messages
    cannot be empty)."""
    return torch.tensor(plan.windows or ((-1, 0),), dtype=torch.long)


def _stage_plan(context_ids, ids, positions, context_length, keep_from, windows) -> ForwardPlan:
    """What :func:`plan_hidden` reads of a plan, from the tensors that cross stages (a stage
    without the embedding gets placeholder ids of the right shapes)."""
    n = int(context_length)
    pairs = tuple((int(s), int(length)) for s, length in windows.tolist())
    return ForwardPlan(context_ids[:, :n] if n else None, int(keep_from), ids, positions,
                       0, ids[:, :0], 0, 0, windows=() if pairs == ((-1, 0),) else pairs)


class GPTStage(torch.nn.Module):
    """One pipeline stage: Megatron-Core's GPTModel with this stage's layers."""

    def __init__(self, model: ModelConfig, parallel: ParallelConfig, vocab_size: int,
                 seed: int) -> None:
        super().__init__()
        self.gpt = build_gpt_model(model, vocab_size, parallel=parallel, seed=seed,
                                   pre_process=parallel_state.is_pipeline_first_stage(),
                                   post_process=parallel_state.is_pipeline_last_stage())

    def forward(self, inputs):
        gpt = self.gpt
        if gpt.pre_process:
            context_ids, ids, positions, context_length, keep_from, windows = inputs
        else:
            rows, positions, context_length, keep_from, windows = inputs
            batch, length = rows.shape[1], len(positions)
            ids = torch.zeros((batch, length), dtype=torch.long, device=rows.device)
            context_ids = torch.zeros((batch, max(1, int(context_length))), dtype=torch.long,
                                      device=rows.device)
            gpt.set_input_tensor(rows)
        plan = _stage_plan(context_ids, ids, positions, context_length, keep_from, windows)
        with final_norm_input(gpt) as pre_norm:
            hidden = plan_hidden(gpt, plan)
        if gpt.post_process:
            return hidden, pre_norm["hidden"]
        return hidden, positions, context_length, keep_from, windows


class PipelineLoss:
    """loss_fn of the PipelineModule: the objective's output of the micro-batch's own plan,
    plus regularizers. The plans arrive with the data on the last stage
    (:meth:`GPTPipeline.feed`), in the order DeepSpeed computes the losses. Metrics of each
    micro-batch are kept in ``metrics`` for the trainer to collect."""

    def __init__(self, regularizers=(), gradient_scale: float = 1.0) -> None:
        self.regularizers = list(regularizers)
        self.gradient_scale = gradient_scale  # see build_pipeline_module
        self.iteration = 0
        self.evaluating = False
        self.metrics: list[dict[str, float]] = []
        self.plans: deque[ForwardPlan] = deque()
        self.model = None  # the last stage's GPTModel

    def __call__(self, outputs, labels):
        hidden, pre_norm = outputs
        out = plan_output(self.model, self.plans.popleft(), hidden, pre_norm)
        if self.evaluating:
            return out.lm_loss()
        total, metrics = apply_regularizers(out, self.regularizers, self.iteration)
        self.metrics.append({k: float(v) for k, v in metrics.items()})
        return total * self.gradient_scale if self.gradient_scale != 1.0 else total


class GPTPipeline(PipelineModule):
    """DeepSpeed's PipelineModule of one :class:`GPTStage` per pipeline rank."""

    def feed(self, plan: ForwardPlan):
        """A plan as the (first-stage inputs, labels) pair DeepSpeed loads on the first and
        last stages; the last stage keeps the plan for its loss."""
        if self.stage_id == self.num_stages - 1:
            self.loss_fn.plans.append(plan)
        context_ids = plan.context_ids if plan.context_ids is not None else plan.ids[:, :1]
        context = 0 if plan.context_ids is None else plan.context_ids.shape[1]
        inputs = (context_ids, plan.ids, plan.positions, _scalar(context),
                  _scalar(plan.context_keep_from), _windows(plan))
        return inputs, plan.labels

    def load_state_dir(self, load_dir, checkpoint_engine, strict=True):
        """This layout's checkpoints load as DeepSpeed loads them; those written before it (one
        file per embedding, transformer layer, final norm and output layer) by whole-model
        names into this stage's GPTModel."""
        files = glob.glob(os.path.join(load_dir, "layer_*-model_00-model_states.pt"))
        if len(files) == self.num_stages:
            return super().load_state_dir(load_dir, checkpoint_engine, strict)
        from localopt_plugin.training.convert import pipeline_weights

        gpt, config = self.forward_funcs[0].gpt, self.model_config
        weights = pipeline_weights(load_dir, config.num_layers,
                                   parallel_state.get_tensor_model_parallel_world_size(),
                                   not config.untie_embeddings_and_output_weights)
        weights = weights[parallel_state.get_tensor_model_parallel_rank()]
        with torch.no_grad():
            for name, param in canonical_parameters(gpt):
                if name not in weights:
                    raise UserError(f"{load_dir}: no {name} in the pipeline checkpoint")
                param.copy_(weights[name])

    def get_tied_weights_and_groups(self):
        """The tied word embedding and output weight, over Megatron's embedding group."""
        gpt = self.forward_funcs[0].gpt
        if (self.num_stages == 1 or not gpt.share_embeddings_and_output_weights
                or not (gpt.pre_process or gpt.post_process)):
            return []
        return [(gpt.shared_embedding_or_output_weight(), parallel_state.get_embedding_group())]


def build_pipeline_module(model: ModelConfig, parallel: ParallelConfig, vocab_size: int,
                          seed: int, regularizers=()) -> GPTPipeline:
    """The GPT as a DeepSpeed PipelineModule over Megatron's parallel layout, with the
    single-process model's initial weights; recomputation is Megatron's own, inside each
    stage's GPTModel.

    DeepSpeed's grid has no context-parallel axis: context ranks count as data ranks of it (in
    Megatron's rank order, TP fastest, then CP, then DP, so its ranks are Megatron's), which
    averages gradients over data x context ranks; each rank's loss is its share of the
    sample's, so it is scaled by the context-parallel size for the shares' gradients to sum
    (as the non-pipelined engine does)."""
    stages = parallel_state.get_pipeline_model_parallel_world_size()
    context = parallel_state.get_context_parallel_world_size()
    topology = PipeModelDataParallelTopology(
        num_pp=stages, num_mp=parallel_state.get_tensor_model_parallel_world_size(),
        num_dp=parallel_state.get_data_parallel_world_size() * context)
    loss = PipelineLoss(regularizers, gradient_scale=float(context))
    module = GPTPipeline(layers=[LayerSpec(GPTStage, model, parallel, vocab_size, seed)
                                 for _ in range(stages)],
                         loss_fn=loss, topology=topology, partition_method="uniform",
                         dynamic_shape=True)
    module.model_config = model
    if module.stage_id == stages - 1:
        loss.model = module.forward_funcs[0].gpt
    return module
