"""Parameter initialisation that does not depend on the parallel layout.

Megatron-Core draws initial weights from one RNG stream in construction order, so a model
split over pipeline stages (or built by another module tree) starts from different weights
than the same model in one process. Here every parameter is drawn from a generator seeded by
(seed, its GPTModel name) as a full "master" tensor with Megatron's init rule, then sliced to
this tensor-parallel rank's partition: single-process, TP and PP runs start identical, so
their losses can be compared and checkpoints mean the same thing.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

# GPTModel parameter-name endings initialised with the scaled "output layer" rule.
_SCALED_INIT = ("linear_proj.weight", "linear_fc2.weight")


def _init_master(name: str, shape: tuple[int, ...], config: TransformerConfig,
                 seed: int) -> torch.Tensor:
    master = torch.empty(shape, dtype=torch.float32)
    if name.endswith(".bias"):
        return master.zero_()
    if "layernorm" in name:  # input_layernorm, pre_mlp_layernorm, final_layernorm, q/k_layernorm
        return master.fill_(0.0 if config.layernorm_zero_centered_gamma else 1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        method = config.output_layer_init_method if name.endswith(_SCALED_INIT) else (
            config.init_method
        )
        method(master)
    return master


@torch.no_grad()
def initialize_parameters(named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
                          config: TransformerConfig, seed: int) -> None:
    """Re-initialise parameters named as in GPTModel, identically on every layout."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in named_parameters:
        shape = list(param.shape)
        partitioned = getattr(param, "tensor_model_parallel", False) and tp_size > 1
        if partitioned:
            shape[param.partition_dim] *= tp_size
        master = _init_master(name, tuple(shape), config, seed)
        if partitioned:
            master = tensor_parallel_slice(master, param.partition_dim,
                                           getattr(param, "partition_stride", 1),
                                           tp_rank, tp_size)
        param.copy_(master.to(param.dtype))


def tensor_parallel_slice(master: torch.Tensor, dim: int, stride: int, rank: int,
                          size: int) -> torch.Tensor:
    """Rank ``rank``'s partition of a full tensor, as Megatron splits it.

    With ``stride`` s the full tensor is ``s`` stacked parts (a gated MLP's ``[gate; up]``
    has s = 2) and each rank holds its slice of every part: pieces ``rank, rank + size, ...``
    of the tensor cut into ``size x s`` equal pieces."""
    pieces = master.chunk(size * stride, dim=dim)
    return torch.cat(pieces[rank::size], dim=dim)


def tensor_parallel_merge(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """The full tensor from every rank's partition (the inverse of tensor_parallel_slice)."""
    pieces = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([rank_pieces[i] for i in range(stride) for rank_pieces in pieces], dim=dim)


def canonical_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """A GPTModel's (or one pipeline stage's) parameters under whole-model names.

    A stage numbers its decoder layers from 0, and the last stage's tied output weight is the
    first stage's word embedding: renaming both lets the name-seeded initialisation give every
    stage split the whole model's weights.
    """
    decoder = getattr(model, "decoder", None)
    layers = {}
    if decoder is not None:
        layers = {f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}."
                  for i, layer in enumerate(decoder.layers)}
    tied_output = (not model.pre_process and model.post_process
                   and model.share_embeddings_and_output_weights)
    for name, param in model.named_parameters():
        if tied_output and name == "output_layer.weight":
            name = "embedding.word_embeddings.weight"
        for local, whole in layers.items():
            if name.startswith(local):
                name = whole + name[len(local):]
                break
        yield name, param
