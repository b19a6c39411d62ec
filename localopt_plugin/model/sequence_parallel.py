"""Megatron's sequence parallelism (``--sequence-parallel`` with tensor parallelism) on the local
layer spec.

Megatron-Core splits the activations between its tensor-parallel regions along the sequence
over the TP ranks (norms, residual adds and dropout run on a slice; the column-parallel linears
gather the sequence, the row-parallel ones reduce-scatter it). Its local spec's torch norm
refuses that, so the spec's norms are swapped for :class:`SequenceParallelNorm`, which runs on
its rows and sums its weights' gradients over the TP ranks in backward (each rank's gradient is
its rows' share), independently of the engine (DeepSpeed or Megatron's DDP).

Megatron splits evenly, so a forward's tokens are padded at the end to a multiple of the TP
size (:func:`padded_rows`): causal attention keeps the padding out of every real token's output,
the attention plan drops it before keeping keys/values, and the objectives drop its outputs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig


class _SumGradientOverTensorParallel(torch.autograd.Function):
    """Identity whose backward all-reduces the gradient over the tensor-parallel group."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SequenceParallelNorm(torch.nn.Module):
    """LayerNorm / RMSNorm (``config.normalization``) over a sequence slice, with the parameter
    names of torch's norms (checkpoints are those of the local spec) and their gradients summed
    over the tensor-parallel ranks."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 **_unused) -> None:
        super().__init__()
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"--normalization {config.normalization} has no sequence-parallel "
                             f"norm in the local spec")
        self.rms = config.normalization == "RMSNorm"
        self.shape, self.eps = (hidden_size,), eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(
            torch.zeros(hidden_size, dtype=config.params_dtype))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        group = parallel_state.get_tensor_model_parallel_group()
        weight = _SumGradientOverTensorParallel.apply(self.weight, group)
        if self.rms:
            return F.rms_norm(hidden, self.shape, weight, self.eps)
        bias = _SumGradientOverTensorParallel.apply(self.bias, group)
        return F.layer_norm(hidden, self.shape, weight, bias, self.eps)


def padded_rows(model: torch.nn.Module, length: int) -> int:
    """Rows to append to a forward of ``length`` tokens so that it splits evenly over the
    tensor-parallel ranks (0 without sequence parallelism)."""
    if not model.config.sequence_parallel:
        return 0
    return -length % parallel_state.get_tensor_model_parallel_world_size()


def sequence_parallel_local_rows(model: torch.nn.Module, length: int) -> int:
    """Rows of a forward of ``length`` tokens this tensor-parallel rank holds: its even slice
    of the padded rows under sequence parallelism, else all of them."""
    if not model.config.sequence_parallel:
        return length
    return (length + padded_rows(model, length)) // (
        parallel_state.get_tensor_model_parallel_world_size())
