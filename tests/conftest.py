"""Shared fixtures. Helpers (launching, model/flag sets, references, data writers) live in
``tests/helpers`` and are imported as ``helpers.*``; unit tests run in-process, integration
tests launch the commands as users do."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # on a GPU (the GPU-marked tests) DeepSpeed picks CUDA
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pytest-xdist, the README's test command): one worker per core, at most 4,
    as the slow tests launch 2-4 processes each and every test runs one thread. Tests are
    shared out one by one (``--dist worksteal``): a module fixture may be built once per
    worker."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session")
def dist_world_of_one():
    """torch.distributed (gloo) and Megatron parallel state for a single process."""
    from localopt_plugin.training.distributed import init_distributed

    init_distributed(seed=1234)
    yield
