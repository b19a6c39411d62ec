"""Platform shims: the one place that makes Megatron-Core and DeepSpeed run on a CPU-only torch.

Megatron-Core 0.16-0.19 calls CUDA-only functions in a few places (parameter allocation, RoPE,
the RNG tracker, pipeline schedules). On a machine with CUDA nothing here is applied, so a GPU
run uses both libraries untouched. Everything is idempotent; call :func:`apply_cpu_shims` before
building a model or a DeepSpeed engine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

_APPLIED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def default_device() -> torch.device:
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def configure_environment() -> None:
    """Environment defaults that must be set before DeepSpeed is imported."""
    if not cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed JIT-builds small ops (the CPU shared-memory comm op on every init); a cache per
    # environment keeps two venvs from invalidating each other's build on every start.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    # Megatron-Core warns on import when neither Apex nor TransformerEngine is present.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")


class CpuRNGStatesTracker:
    """Megatron's RNG tracker contract (add/fork/get_states/set_states) on CPU generator states.

    Megatron forks named RNG streams so that dropout differs across tensor-parallel ranks but
    matches across data-parallel ranks; on CPU the global torch generator plays the CUDA one's role.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already tracked")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already tracked")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} is not tracked")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def seed_model_parallel_rng(seed: int) -> None:
    """Seed Megatron's named RNG streams (data-, tensor- and expert-parallel).

    On GPU this is Megatron's own ``model_parallel_cuda_manual_seed``; on CPU the same three
    streams are created from CPU generators with Megatron's seed offsets.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(seed)
    if cuda_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    tracker = CpuRNGStatesTracker()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def apply_cpu_shims() -> None:
    """Patch the CUDA-only call sites of Megatron-Core when torch has no CUDA."""
    global _APPLIED
    configure_environment()
    if _APPLIED or cuda_available():
        return
    _APPLIED = True
    # Small weights/activations late in training become subnormal floats, which x86 CPUs
    # process tens of times slower: flush them to zero (the usual setting for CPU training).
    torch.set_flush_denormal(True)
    # Megatron allocates buffers with device=torch.cuda.current_device(); "cpu" is a valid device.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    # Pipeline schedules synchronise the (absent) CUDA stream around p2p exchanges.
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    _patch_pipeline_schedules()
    _patch_tied_embedding_setup()
    _patch_recompute_rng()
    log.debug("CPU shims applied to Megatron-Core")


def _patch_pipeline_schedules() -> None:
    """Megatron's schedules create token counters with a hard-coded device="cuda"."""
    from megatron.core.pipeline_parallel import schedules

    real_zeros = torch.zeros

    def zeros_on_cpu(*args, **kwargs):
        if str(kwargs.get("device")) == "cuda":
            kwargs["device"] = "cpu"
        return real_zeros(*args, **kwargs)

    class _TorchOnCpu:
        """Proxy of the torch module as seen from megatron.core.pipeline_parallel.schedules."""

        def __getattr__(self, name: str):
            return zeros_on_cpu if name == "zeros" else getattr(torch, name)

    schedules.torch = _TorchOnCpu()


def _patch_tied_embedding_setup() -> None:
    """With pipeline stages and tied embeddings, Megatron-Core moves the word embedding with
    ``.cuda()`` before all-reducing it over the first and last stage."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    def setup_on_cpu(self) -> None:
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor  # type: ignore[assignment]
        try:
            original(self)
        finally:
            torch.Tensor.cuda = cuda  # type: ignore[assignment]

    LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu


def _patch_recompute_rng() -> None:
    """Activation recomputation saves and restores the CUDA generator's state around the
    recomputed forward; without CUDA there is none (the CPU generator and the RNG tracker,
    which it also saves and restores, hold every state dropout uses)."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None
