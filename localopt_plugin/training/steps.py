"""One training step, two strategies: data-parallel engines and DeepSpeed's pipeline engine.

Both feed the objective the **global** micro-batch index ``accumulation_step x data-parallel
size + data-parallel rank`` (the order in which loaders hand out a global batch), which keys
the window draw: any layout with the same global batch trains the same windows. Both return the
step's metrics averaged over its micro-batches on this rank; the loop averages over ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from localopt_plugin.data.source import VideoTokenSource
from localopt_plugin.metric_names import GRAD_NORM
from localopt_plugin.objectives import FullSequence, global_micro_batch
from localopt_plugin.platform import default_device
from localopt_plugin.regularizers import apply_regularizers
from localopt_plugin.training.config import TrainConfig


class TrainingStep(torch.nn.Module):
    """The module DeepSpeed wraps: the GPT plus the objective and regularizers computing the loss.

    forward returns the loss to backpropagate (the total loss times ``gradient_scale``), a dict
    of detached scalars to log and the token count.
    """

    def __init__(self, model: torch.nn.Module, objective, regularizers=(),
                 gradient_scale: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.regularizers = list(regularizers)
        self.gradient_scale = gradient_scale

    def forward(self, tokens: torch.Tensor, iteration: int, micro_batch: int):
        out = self.objective(self.model, tokens, iteration, micro_batch)
        total, metrics = apply_regularizers(out, self.regularizers, iteration)
        if self.gradient_scale != 1.0:
            total = total * self.gradient_scale
        return total, metrics, out.num_tokens


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def _grad_norm_before_step(engine) -> float | None:
    """DeepSpeed reports no norm for fp32 ZeRO-0 (it discards the clip's); compute it there."""
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None  # the engine's optimizer records it during step()
    from deepspeed.runtime.utils import get_global_norm_of_tensors
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    # Count parameters replicated across tensor-parallel ranks (norms, row-parallel biases,
    # position embeddings) once, as Megatron does: the mpu sum adds every rank's norm.
    grads = [p.grad for p in engine.module.parameters()
             if p.grad is not None and param_is_not_tensor_parallel_duplicate(p)]
    return float(get_global_norm_of_tensors(grads, mpu=engine.mpu))


def data_parallel_step(engine, stream, config: TrainConfig, iteration: int) -> dict[str, float]:
    """Gradient accumulation over micro-batches; returns the micro-batch-averaged metrics."""
    sums: dict[str, float] = {}
    grad_norm = None
    steps = config.gradient_accumulation_steps
    for micro in range(steps):
        tokens = next(stream)["tokens"].to(default_device(), non_blocking=True)
        loss, metrics, _ = engine(tokens, iteration, global_micro_batch(micro))
        engine.backward(loss)
        if micro == steps - 1:
            grad_norm = _grad_norm_before_step(engine)
        engine.step()
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    record = {k: v / steps for k, v in sums.items()}
    record[GRAD_NORM] = grad_norm if grad_norm is not None else engine.get_global_grad_norm()
    return record


def pipeline_step(engine, stream, objective, config: TrainConfig,
                  iteration: int) -> dict[str, float]:
    """One DeepSpeed pipeline train_batch; metrics travel from the last stage to all stages."""
    loss_fn = engine.module.loss_fn
    loss_fn.iteration, loss_fn.metrics = iteration, []
    loss_fn.plans.clear()
    plans = []  # the stages that load data (first, last) plan the micro-batches: the window

    def batches():
        for micro in range(config.gradient_accumulation_steps):
            plans.append(objective.plan(next(stream)["tokens"], iteration,
                                        global_micro_batch(micro)))
            yield engine.module.feed(plans[-1])

    engine.train_batch(data_iter=batches())
    record = None
    if engine.is_last_stage():
        record = {k: sum(m[k] for m in loss_fn.metrics) / len(loss_fn.metrics)
                  for k in loss_fn.metrics[0]}
    box = [record]
    dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                               group=parallel_state.get_pipeline_model_parallel_group())
    record = box[0]
    for key in plans[0].metrics if plans else ():
        record[key] = sum(p.metrics[key] for p in plans) / len(plans)
    record[GRAD_NORM] = engine.get_global_grad_norm()
    return record


@torch.no_grad()
def evaluate(engine, source: VideoTokenSource, config: TrainConfig) -> float:
    """Full-sequence validation loss (whatever the training objective) over ``--eval-iters``
    global batches, as Megatron counts them (each rank: its micro-batches of every global
    batch), averaged over ranks. The caller skips it without validation data."""
    full = FullSequence(source.layout)
    stream = source.valid.batches(config.micro_batch_size,
                                  parallel_state.get_data_parallel_rank(),
                                  config.data_parallel_size, config.run.seed)
    rounds, micro = config.run.eval_iters, config.gradient_accumulation_steps
    device = default_device()
    engine.eval()
    total = torch.zeros((), device=device)
    if is_pipeline(engine):
        loss_fn = engine.module.loss_fn
        loss_fn.evaluating = True
        loss_fn.plans.clear()
        batches = (engine.module.feed(full.plan(next(stream)["tokens"]))
                   for _ in range(rounds * micro))
        for _ in range(rounds):  # each eval_batch runs one global batch's micro-batches
            total += engine.eval_batch(batches, reduce_output="avg").float().to(device).sum()
        loss_fn.evaluating = False
    else:
        for _ in range(rounds * micro):
            tokens = next(stream)["tokens"].to(device)
            out = full(engine.module.model, tokens)
            total += out.lm_loss().float() / micro  # the whole sample's under context parallelism
    total /= rounds
    engine.train()
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return total.item() / config.data_parallel_size
