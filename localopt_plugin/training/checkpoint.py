"""Checkpoints: DeepSpeed's (model, optimizer, LR scheduler) plus what exact resumption and
generation need.

Stored beside DeepSpeed's states: the loader position (consumed samples), every rank's RNG
states, and the run's versioned configuration (:meth:`TrainConfig.to_dict`) with the
vocabulary, sample layout and data description, so a model can be rebuilt from the checkpoint
alone (:mod:`localopt_plugin.training.convert`). The window sampler needs no state: its draws
are a function of (seed, iteration, micro-batch).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from localopt_plugin.data.source import VideoTokenSource
from localopt_plugin.platform import cuda_available
from localopt_plugin.training.config import TrainConfig
from localopt_plugin.training.distributed import is_rank0

log = logging.getLogger("localopt_plugin.train")

# What must match for a resumed run to continue exactly as an uninterrupted one.
EXACT_RESUME_KEYS = ("data_parallel_size", "micro_batch_size", "global_batch_size")


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0


def tag_of(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rng_file(directory: str, tag: str) -> str:
    return os.path.join(directory, tag, f"rng_state_rank{dist.get_rank():05d}.pt")


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if cuda_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if cuda_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda o: dataclasses.asdict(o)
                                 if dataclasses.is_dataclass(o) else str(o)))


def save_checkpoint(engine, config: TrainConfig, state: TrainState,
                    source: VideoTokenSource, objective=None) -> None:
    """Every rank writes its part; returns when all have."""
    tag = tag_of(state.iteration)
    directory = config.run.save
    engine.save_checkpoint(
        directory, tag=tag,
        client_state={"iteration": state.iteration, "consumed_samples": state.consumed_samples,
                      "world_size": dist.get_world_size(),
                      "config": config.to_dict(),
                      "vocabulary": dataclasses.asdict(source.vocab),
                      "layout": dataclasses.asdict(source.layout),
                      "data_info": _jsonable(source.info),
                      "objective_state": objective.state_dict() if objective else {}},
    )
    torch.save(_rng_state(), _rng_file(directory, tag))
    dist.barrier()
    if is_rank0():
        log.info("saved checkpoint %s/%s", directory, tag)


def recorded_config(directory: str) -> dict | None:
    """The run configuration the latest checkpoint in ``directory`` recorded (``config``, or a
    version 1 checkpoint's flat ``args``), read without loading its tensors; None without one."""
    latest = os.path.join(directory, "latest")
    if not os.path.exists(latest):
        return None
    with open(latest) as f:
        tag = f.read().strip()
    files = sorted(glob.glob(os.path.join(directory, tag, "*mp_rank_00_model_states.pt")))
    if not files:
        return None
    client = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    return client.get("config", client.get("args"))


def load_checkpoint(engine, config: TrainConfig, objective=None) -> TrainState:
    """Resume ``engine`` (and the objective's state: an adaptive window sampler's losses), with
    what Megatron's resume flags leave out: ``--no-load-optim`` (optimizer and LR schedule),
    ``--no-load-lr-state``, ``--no-load-rng``, ``--finetune`` (weights only, from iteration 0)
    and ``--reset-iteration`` (iteration and consumed samples from 0)."""
    run = config.run
    directory = run.load
    path, client = engine.load_checkpoint(
        directory, load_module_only=run.finetune,
        load_optimizer_states=not (run.finetune or run.no_load_optim),
        load_lr_scheduler_states=not (run.finetune or run.no_load_optim
                                      or run.no_load_lr_state))
    if path is None:
        if is_rank0():
            log.warning("no checkpoint found in --load %s; starting from scratch", directory)
        return TrainState()
    tag = tag_of(client["iteration"])
    rng_file = _rng_file(directory, tag)
    load_rng = not (run.finetune or run.no_load_rng)  # else this run's own random states
    if load_rng and os.path.exists(rng_file) and client.get("world_size") == dist.get_world_size():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    elif load_rng and is_rank0():
        log.warning("RNG states not restored (saved with world size %s, now %d): dropout "
                    "masks will differ from an uninterrupted run", client.get("world_size"),
                    dist.get_world_size())
    if objective is not None and not run.finetune:
        objective.load_state_dict(client.get("objective_state", {}))
    saved = client.get("config", {})
    changed = {key: (saved[key], getattr(config, key)) for key in EXACT_RESUME_KEYS
               if key in saved and saved[key] != getattr(config, key)}
    if changed and is_rank0():
        log.warning("resuming with different %s (saved -> now): the run continues, but not "
                    "exactly as the uninterrupted one would (data order and window draws "
                    "depend on them)", {k: f"{a} -> {b}" for k, (a, b) in changed.items()})
    state = TrainState(client["iteration"], client["consumed_samples"])
    if run.finetune or run.reset_iteration:  # Megatron: iteration 0, the data from its start
        state = TrainState()
        engine.global_steps = engine.global_samples = 0
    if is_rank0():
        log.info("resumed from %s (saved at iteration %d) at iteration %d (%d samples "
                 "consumed)", path, client["iteration"], state.iteration,
                 state.consumed_samples)
    return state
