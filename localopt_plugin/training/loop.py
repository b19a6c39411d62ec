"""The training loop: a DeepSpeed engine around a Megatron-Core GPTModel and a registered objective.

DeepSpeed owns the optimizer step (ZeRO 0-3, gradient accumulation, clipping, bf16/fp16) and
steps the LR schedule; the plugin supplies the loss. :func:`setup` builds everything from a
resolved :class:`~localopt_plugin.training.config.TrainConfig`; :func:`train` runs the loop
(steps: :mod:`.steps`, checkpoints: :mod:`.checkpoint`, metrics: :mod:`.metrics`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from localopt_plugin.data.source import VideoTokenSource
from localopt_plugin.metric_names import (
    GLOBAL_BATCH,
    GRAD_NORM,
    ITERATION,
    LEARNING_RATE,
    SKIPPED_SAMPLES,
    STEP_TIME,
    TOKENS_PER_SECOND,
    VALID_LOSS,
    VALID_PPL,
)
from localopt_plugin.model import build_gpt_model
from localopt_plugin.pause_point import pause_point
from localopt_plugin.platform import cuda_available
from localopt_plugin.plugin import PluginParts
from localopt_plugin.training.checkpoint import (
    TrainState,
    load_checkpoint,
    save_checkpoint,
)
from localopt_plugin.training.config import TrainConfig
from localopt_plugin.training.distributed import MegatronMpu, is_rank0
from localopt_plugin.training.metrics import MetricsLogger
from localopt_plugin.training.optim import build_optimizer, build_scheduler, param_groups
from localopt_plugin.training.optimizer_states import optimizer_state_norms
from localopt_plugin.training.steps import (
    TrainingStep,
    data_parallel_step,
    evaluate,
    is_pipeline,
    pipeline_step,
)

log = logging.getLogger("localopt_plugin.train")


@dataclass
class Trainer:
    """What :func:`setup` builds."""

    engine: object
    scheduler: object
    source: VideoTokenSource
    objective: object


def _zero3_under_context_parallelism(module: TrainingStep, config: TrainConfig, mpu) -> None:
    """What DeepSpeed's ZeRO-3 needs for context-parallel shares to sum, as stages 0-2 do.

    DeepSpeed partitions a model it converts to ZeRO-3 over mpu's data-parallel group (data
    ranks only): the module is converted here over data x context ranks, where its reduction
    then runs. Its reduce-scatter (``reduce_scatter: true``; ``false`` is refused with context
    parallelism by :func:`~localopt_plugin.training.config.resolve`) then averages over data x
    context ranks where stages 0-2 divide by the data ranks only: the backpropagated loss is
    scaled by the context-parallel size. Together they give ZeRO-0's gradients (tested).
    """
    import deepspeed

    module.gradient_scale = float(config.parallel.context_parallel_size)
    deepspeed.zero.Init(module=module, config_dict_or_path=config.deepspeed.config,
                        data_parallel_group=mpu.get_sequence_data_parallel_group(), mpu=mpu)


def setup(config: TrainConfig, parts: PluginParts) -> Trainer:
    """Model, optimizer, schedule and DeepSpeed engine around the run's objective and
    regularizers (process groups must exist)."""
    import deepspeed

    source, objective, regularizers = parts.source, parts.objective, list(parts.regularizers)
    if config.parallel.pipeline_model_parallel_size > 1:
        from localopt_plugin.training.pipeline import build_pipeline_module

        module = build_pipeline_module(config.model, config.parallel, source.vocab.size,
                                       config.run.seed, regularizers)
        mpu = None  # the PipelineModule brings its own grid (same rank layout as Megatron's)
    else:
        model = build_gpt_model(config.model, source.vocab.size, parallel=config.parallel,
                                seed=config.run.seed)
        module = TrainingStep(model, objective, regularizers)
        mpu = MegatronMpu()
        zero3 = config.deepspeed.config["zero_optimization"]["stage"] == 3
        if zero3 and model.share_embeddings_and_output_weights:
            # The output layer uses the embedding's (ZeRO-3 partitioned) weight.
            deepspeed.zero.register_external_parameter(
                model.output_layer, model.shared_embedding_or_output_weight())
        if zero3 and config.parallel.context_parallel_size > 1:
            _zero3_under_context_parallelism(module, config, mpu)
    groups = param_groups(module)
    if is_rank0():
        for note in config.flag_notes:
            log.info("flags: %s", note)
        for note in config.deepspeed.notes:
            log.info("DeepSpeed config: %s", note)
    engine, _, _, scheduler = deepspeed.initialize(
        model=module,
        optimizer=build_optimizer(groups, config),
        model_parameters=groups,
        lr_scheduler=build_scheduler(config),
        config=config.deepspeed.config,
        mpu=mpu,
    )
    return Trainer(engine, scheduler, source, objective)


def _time_is_up(config: TrainConfig, started: float) -> bool:
    """Megatron's --exit-duration-in-mins, decided on rank 0 so that every rank stops together."""
    if config.run.exit_duration_in_mins is None:
        return False
    done = torch.tensor([time.perf_counter() - started > 60 * config.run.exit_duration_in_mins])
    dist.broadcast(done, src=0)
    return bool(done.item())


def skipped_samples(source: VideoTokenSource) -> Counter[str]:
    """Bad samples the loaders skipped so far, by reason, summed over data-parallel ranks."""
    mine = dict(getattr(source.train, "skipped_samples", Counter)())
    gathered: list[dict] = [{} for _ in range(parallel_state.get_data_parallel_world_size())]
    dist.all_gather_object(gathered, mine, group=parallel_state.get_data_parallel_group())
    total: Counter[str] = Counter()
    for counts in gathered:
        total.update(counts)
    return total


def _skip_metrics(total: Counter[str]) -> dict[str, float]:
    return {SKIPPED_SAMPLES: float(sum(total.values())),
            **{f"skipped: {reason}": float(n) for reason, n in sorted(total.items())}}


def train(config: TrainConfig, parts: PluginParts) -> dict:
    """Run training; returns the logged records, the final state and the skip counts."""
    trainer = setup(config, parts)
    source = parts.source
    engine, run = trainer.engine, config.run
    state = (load_checkpoint(engine, config, trainer.objective) if run.load
             else TrainState())
    stream = source.train.batches(config.micro_batch_size,
                                  parallel_state.get_data_parallel_rank(),
                                  config.data_parallel_size, run.seed, state.consumed_samples)
    logger = MetricsLogger(run, start_iteration=state.iteration)
    layout = source.layout
    tokens_per_sample = layout.num_frames * layout.frame_tokens
    pipeline = is_pipeline(engine)
    history: list[dict] = []
    evaluating = bool(run.eval_interval) and source.valid is not None
    if run.eval_interval and not evaluating and is_rank0():
        log.info("no validation data (--valid-data-path): no evaluation, as Megatron skips "
                 "it")
    started = time.perf_counter()
    while state.iteration < run.train_iters and not _time_is_up(config, started):
        start = time.perf_counter()
        if pipeline:
            record = pipeline_step(engine, stream, trainer.objective, config, state.iteration)
        else:
            record = data_parallel_step(engine, stream, config, state.iteration)
        grad_norm = record.pop(GRAD_NORM)
        names = sorted(record)
        averaged = torch.tensor([record[k] for k in names], dtype=torch.float64)
        dist.all_reduce(averaged, group=parallel_state.get_data_parallel_group())
        averaged /= config.data_parallel_size
        state.iteration += 1
        state.consumed_samples += config.global_batch_size
        step_time = time.perf_counter() - start
        record = dict(zip(names, averaged.tolist(), strict=True))
        trainer.objective.observe(record)  # the same on every rank: an adaptive draw learns
        record.update({
            ITERATION: state.iteration,
            LEARNING_RATE: trainer.scheduler.get_last_lr()[0],
            GRAD_NORM: float("nan") if grad_norm is None else float(grad_norm),
            STEP_TIME: step_time,
            GLOBAL_BATCH: config.global_batch_size,
            TOKENS_PER_SECOND: config.global_batch_size * tokens_per_sample / step_time,
        })
        if state.iteration % run.log_interval == 0 or state.iteration == run.train_iters:
            record.update(_skip_metrics(skipped_samples(source)))
            if run.log_optimizer_states_to_tensorboard:
                record.update(optimizer_state_norms(
                    engine, config.deepspeed.config["zero_optimization"]["stage"]))
        if evaluating and state.iteration % run.eval_interval == 0:
            record[VALID_LOSS] = evaluate(engine, source, config)
            record[VALID_PPL] = math.exp(min(20.0, record[VALID_LOSS]))
        history.append(record)
        logger.log(record)
        if run.save and run.save_interval and state.iteration % run.save_interval == 0:
            save_checkpoint(engine, config, state, source, trainer.objective)
        pause_point("train-iteration", state.iteration)  # where kill tests stop it
        if run.exit_interval and state.iteration % run.exit_interval == 0:
            if is_rank0():
                log.info("--exit-interval %d: stopping at iteration %d", run.exit_interval,
                         state.iteration)
            break  # saved below unless just saved, as Megatron-LM exits
    if run.save and (not run.save_interval or state.iteration % run.save_interval):
        save_checkpoint(engine, config, state, source, trainer.objective)
    skipped = skipped_samples(source)
    logger.summary({"iterations": state.iteration, "samples": state.consumed_samples,
                    **_skip_metrics(skipped)})
    logger.close()
    return {"history": history, "state": state, "skipped": dict(skipped)}


def configure_logging() -> None:
    level = os.environ.get("LOCALOPT_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level if is_rank0() else "WARNING",
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    if not cuda_available():
        logging.getLogger("DeepSpeed").setLevel("WARNING")
