"""Platform shims: the one place that makes Megatron-Core, Megatron-LM and DeepSpeed run on a
CPU-only torch.

Megatron-Core 0.16-0.19 and Megatron-LM's loop call CUDA-only functions in places (parameter
allocation, RoPE, the RNG tracker, pipeline schedules, recomputation, Megatron-LM's tensors for
flags and timers). On a machine with CUDA nothing here is applied (except the one packaging
fix in :func:`apply_megatron_lm_shims`), so a GPU run uses the libraries untouched. Everything
is idempotent; call :func:`apply_cpu_shims` before building a model or a DeepSpeed engine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import warnings
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

_APPLIED = False
# the TORCH_EXTENSIONS_DIR this module chose (not the user), so that a child can tell
_OWN_EXTENSIONS_DIR = "LOCALOPT_DEFAULT_TORCH_EXTENSIONS_DIR"


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
    # environment keeps two venvs from invalidating each other's build on every start. A child
    # in another environment (Megatron-LM's Python 3.12 launched from the 3.11 one) inherits the
    # parent's default: replaced by its own, so that it never loads a build for another Python;
    # a folder the user set is kept.
    inherited = os.environ.get("TORCH_EXTENSIONS_DIR")
    if inherited is None or inherited == os.environ.get(_OWN_EXTENSIONS_DIR):
        own = os.path.join(sys.prefix, "torch_extensions")
        os.environ["TORCH_EXTENSIONS_DIR"] = os.environ[_OWN_EXTENSIONS_DIR] = own
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


class _NoStream:
    """A CUDA stream's interface where there are no streams: work is already in order."""

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _cpu_when_cuda(factory):
    """A tensor factory that makes CPU tensors when asked for CUDA ones."""

    @functools.wraps(factory)
    def make(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and str(device).startswith("cuda"):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return make


_TENSOR_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn",
                     "randint")


def apply_cpu_shims() -> None:
    """Make Megatron-Core's (and Megatron-LM's) CUDA call sites work when torch has no CUDA.

    Without CUDA there is one device, the CPU: a request for the current CUDA device, a CUDA
    tensor or a move to CUDA gets the CPU; streams and synchronisation do nothing (work is in
    order); the CUDA generator's state is empty (dropout draws from the CPU generator and the
    RNG tracker, whose states are kept). Each is applied once and only when CUDA is absent.
    """
    global _APPLIED
    configure_environment()
    if _APPLIED or cuda_available():
        return
    _APPLIED = True
    # Small weights/activations late in training become subnormal floats, which x86 CPUs
    # process tens of times slower: flush them to zero (the usual setting for CPU training).
    torch.set_flush_denormal(True)
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    cuda.Stream = cuda.current_stream = cuda.default_stream = (  # type: ignore[assignment]
        lambda *args, **kwargs: _NoStream())
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()  # type: ignore[assignment]
    cuda.get_rng_state = cuda.random.get_rng_state = (  # type: ignore[assignment]
        lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8))
    cuda.set_rng_state = cuda.random.set_rng_state = (  # type: ignore[assignment]
        lambda *args, **kwargs: None)
    for name in _TENSOR_FACTORIES:
        setattr(torch, name, _cpu_when_cuda(getattr(torch, name)))
    torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor  # type: ignore[assignment]
    torch.nn.Module.cuda = lambda module, *args, **kwargs: module  # type: ignore[assignment]
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as megatron_random

    # Megatron-LM seeds its RNG tracker with CUDA generators; seed the CPU one instead.
    tensor_parallel.model_parallel_cuda_manual_seed = (
        lambda seed, *args, **kwargs: seed_model_parallel_rng(seed))
    # Recomputation restores the CUDA generator's state through a deferred CUDA call, which
    # without CUDA would be queued (and kept) forever.
    megatron_random._set_cuda_rng_state = lambda *args, **kwargs: None
    log.debug("CPU shims applied to Megatron-Core")


class _OneDeviceCuda:
    """``torch.cuda`` as Megatron-LM's initialisation must see it to start without CUDA."""

    def __getattr__(self, name: str):
        if name == "is_available":
            return lambda: True
        if name == "device_count":
            return lambda: 1
        if name == "set_device":
            return lambda *args, **kwargs: None
        return getattr(torch.cuda, name)


class _TorchForMegatronInit:
    """``torch`` as seen from ``megatron.training.initialize``: one device, which is the CPU."""

    cuda = _OneDeviceCuda()

    def __getattr__(self, name: str):
        if name == "device":
            return lambda spec, *args: torch.device("cpu") if str(spec).startswith("cuda") \
                else torch.device(spec, *args)
        return getattr(torch, name)


def apply_megatron_lm_shims() -> None:
    """What Megatron-LM's ``pretrain()`` needs beyond :func:`apply_cpu_shims`.

    * Without CUDA: ``initialize_megatron`` asserts CUDA and sets up model parallelism and the
      RNG tracker only when it counts a device; it sees one device (the CPU) instead. Argument
      validation asks for the device's architecture under tensor parallelism: none (0), with
      which Megatron-LM wants ``CUDA_DEVICE_MAX_CONNECTIONS=1`` as before Blackwell.
    * Always: megatron-core's wheel ships the compiled dataset helper but not its Makefile, and
      ``initialize_megatron`` still runs ``make`` (which fails, ending the run); with the
      compiled helper importable, that compile step just imports it.
    """
    import importlib

    from megatron.core.datasets import utils as dataset_utils

    apply_cpu_shims()
    makefile = os.path.join(os.path.dirname(dataset_utils.__file__), "Makefile")
    if not os.path.exists(makefile):
        dataset_utils.compile_helpers = lambda: importlib.import_module(
            "megatron.core.datasets.helpers_cpp")
    if not cuda_available():
        import megatron.training.arguments as arguments
        import megatron.training.initialize as initialize

        initialize.torch = _TorchForMegatronInit()
        if hasattr(arguments, "get_device_arch_version"):
            arguments.get_device_arch_version = lambda: 0
