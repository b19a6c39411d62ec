"""The dry run's rehearsal: what a run builds at start, built here on a stand-in model.

The rules of :func:`~localopt_plugin.training.config.resolve` catch what they know; what
DeepSpeed, its optimizer, ZeRO or the data loaders would only refuse once running (an optimizer
option it does not take, an offload device this machine cannot serve, a shard that does not
decode) is found by building it: the DeepSpeed engine with the run's JSON (optimizer, scheduler,
ZeRO stage and offload, precision) around a stand-in model of the run's architecture at tiny
sizes, in a world of one process, then one training step on a sample of the training stream
(samples of at most ``STEP_TOKENS`` tokens; longer ones are only read) and one sample of the
validation stream. Whatever fails becomes one ``error:`` line. The parallel
layout is not rehearsed (one process has no other ranks); the rules check it.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import time

import torch.distributed as dist

from localopt_plugin.errors import UserError
from localopt_plugin.metric_names import TOTAL_LOSS
from localopt_plugin.model import ParallelConfig
from localopt_plugin.plugin import PluginParts
from localopt_plugin.training.config import TrainConfig

STEP_TOKENS = 8192  # the longest sample the stand-in trains a step on (attention is quadratic)
STAND_IN = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "kv_channels": None,
            "ffn_hidden_size": 64}


def stand_in(config: TrainConfig) -> TrainConfig:
    """The run's configuration for one process and a model of 1 layer x 32 (2 heads; 1 query
    group under GQA), its architecture switches, precision and recomputation kept, the DeepSpeed
    JSON's batch keys set to one sample per step (the batch arithmetic is checked by rule)."""
    model = dataclasses.replace(config.model, **STAND_IN, num_query_groups=1,
                                recompute_num_layers=config.model.recompute_num_layers and 1)
    ds = config.deepspeed
    ds = dataclasses.replace(ds, config={**ds.config, "train_batch_size": 1,
                                         "train_micro_batch_size_per_gpu": 1,
                                         "gradient_accumulation_steps": 1})
    return dataclasses.replace(config, model=model, parallel=ParallelConfig(), deepspeed=ds,
                               data_parallel_size=1, micro_batch_size=1, global_batch_size=1,
                               gradient_accumulation_steps=1)


def _world_of_one(seed: int) -> None:
    """Process groups of one process (an in-memory store: no port, whatever launched the dry
    run), with the environment DeepSpeed reads for it. They stay for the rest of the process,
    torn down at exit: DeepSpeed keeps the groups it saw, so a later engine in the same process
    (a test's) needs the same world; a world of one that exists already is used."""
    from megatron.core import parallel_state

    from localopt_plugin.training.distributed import destroy_distributed, init_distributed

    one = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    if not dist.is_initialized():  # DeepSpeed reads them: they describe the world kept
        os.environ.update(one)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        atexit.register(destroy_distributed)
    elif dist.get_world_size() != 1 or (
            parallel_state.model_parallel_is_initialized()
            and dist.get_world_size(parallel_state.get_model_parallel_group()) != 1):
        raise RuntimeError("the dry run's rehearsal runs in a world of one process")
    init_distributed(ParallelConfig(), seed)


def rehearse(config: TrainConfig, parts: PluginParts) -> dict:
    """Build what the run builds and take one step on a stand-in model; returns what was
    built, or raises :class:`UserError` with the failure in one line."""
    from localopt_plugin.training.loop import setup
    from localopt_plugin.training.steps import data_parallel_step

    small = stand_in(config)
    started = time.perf_counter()
    stage = "building the DeepSpeed engine"
    _world_of_one(config.run.seed)
    try:
        trainer = setup(small, parts)
        stage = "reading the training stream"
        stream = parts.source.train.batches(small.micro_batch_size, 0, 1, config.run.seed)
        stage = "a training step"
        if config.seq_length <= STEP_TOKENS:
            loss = data_parallel_step(trainer.engine, stream, small, 0).get(TOTAL_LOSS)
        else:
            next(stream)
            loss = (f"not rehearsed: {config.seq_length} tokens per sample (the stand-in "
                    f"steps on at most {STEP_TOKENS})")
        if parts.source.valid is not None:
            stage = "reading the validation stream"
            next(parts.source.valid.batches(small.micro_batch_size, 0, 1, config.run.seed))
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001  whatever the run would stop on, as one line
        message = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"the run would stop at start ({stage}, rehearsed on a stand-in "
                        f"model of 1 layer in one process): {type(err).__name__}: "
                        f"{message}") from err
    optimizer = type(trainer.engine.optimizer).__name__
    return {"stand-in model": "1 layer x 32, 2 heads, one sample per step, one process (the "
            "layout and the batch arithmetic are checked by rule)", "optimizer": optimizer,
            "zero stage": small.deepspeed.config["zero_optimization"]["stage"],
            "first step loss": loss,
            "seconds": round(time.perf_counter() - started, 1)}
