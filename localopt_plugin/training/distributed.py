"""Process groups: torch.distributed through DeepSpeed, model parallelism through Megatron-Core.

Works under torchrun, the ``deepspeed`` launcher, ``mpirun`` (DeepSpeed reads rank and size
through mpi4py) and as a single process with no launcher at all.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket

import torch
import torch.distributed as dist

from localopt_plugin.model.config import ParallelConfig
from localopt_plugin.platform import apply_cpu_shims, cuda_available, seed_model_parallel_rng


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(parallel: ParallelConfig | None = None, seed: int = 1234) -> None:
    """Initialise torch.distributed (if needed), Megatron's parallel state for ``parallel``
    (default: one process holds the whole model) and RNG streams."""
    parallel = parallel or ParallelConfig()
    apply_cpu_shims()
    import deepspeed
    from megatron.core import parallel_state

    if not dist.is_initialized():
        launched = any(k in os.environ for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))
        if not launched:  # a plain `python` run: a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = parallel.distributed_backend or ("nccl" if cuda_available() else "gloo")
        timeout = datetime.timedelta(minutes=parallel.distributed_timeout_minutes)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True,
                                   verbose=False, timeout=timeout)
        # Gloo's worker threads outlive an undestroyed group and abort the process at
        # interpreter exit ("terminate called without an active exception", pytorch#190489).
        atexit.register(destroy_distributed)
    if cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    parallel.check_world(dist.get_world_size())
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
        )
    seed_model_parallel_rng(seed)


def destroy_distributed() -> None:
    """Tear down Megatron's groups and the default group; a no-op when none exist."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class MegatronMpu:
    """The ``mpu`` object DeepSpeed expects, backed by Megatron-Core's parallel_state.

    DeepSpeed's "model parallel" means tensor parallel; Megatron-Core lacks those names.
    """

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self._ps = parallel_state

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    # DeepSpeed's sequence-parallel names (Ulysses) = Megatron's context parallelism: DeepSpeed
    # then reduces gradients and partitions ZeRO state over data x context-parallel ranks and
    # averages over data-parallel ranks only (context-parallel ranks hold shares of one loss).
    def get_sequence_parallel_world_size(self) -> int:
        return self._ps.get_context_parallel_world_size()

    def get_sequence_parallel_rank(self) -> int:
        return self._ps.get_context_parallel_rank()

    def get_sequence_parallel_group(self):
        return self._ps.get_context_parallel_group()

    def get_sequence_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_sequence_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank(with_context_parallel=True)

    def get_sequence_data_parallel_group(self):
        return self._ps.get_data_parallel_group(with_context_parallel=True)

    def __getattr__(self, name: str):
        # get_data_parallel_*, get_tensor_model_parallel_*, get_pipeline_model_parallel_*, ...
        return getattr(self._ps, name)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
