"""``--log-optimizer-states-to-tensorboard`` (Megatron-DeepSpeed): norms of Adam's states and of
the weights it updates, as Megatron-DeepSpeed's ``training_log`` writes them.

L2 and L1 norms and the largest absolute value of the variance (``exp_avg_sq``), its square root,
the momentum (``exp_avg``) and the weights, over every parameter the optimizer holds on this
rank: under ZeRO each data-parallel rank holds a partition of flat fp32 weights and states, so
the sums run over the data-parallel group too; tensor- and pipeline-parallel ranks hold disjoint
slices and are summed as well (tensor-parallel replicas, e.g. norms' weights, count once per
rank, as Megatron-DeepSpeed counts them). An optimizer without these states (SGD) logs none.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

NAMES = ("variance", "variance_sqrt", "momentum", "weight")


def _base_optimizer(engine):
    """The optimizer whose ``state`` holds the moments (ZeRO wraps one)."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def optimizer_state_norms(engine, zero_stage: int) -> dict[str, float]:
    """``optimizer/{name}_l2``, ``_l1`` and ``_abs_max`` for the names in ``NAMES``; {} when
    the optimizer keeps no Adam moments."""
    optimizer = _base_optimizer(engine)
    sums = torch.zeros(2 * len(NAMES), dtype=torch.float64)  # l2^2 then l1, per name
    maxima = torch.zeros(len(NAMES), dtype=torch.float64)
    found = False
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "exp_avg" not in state or "exp_avg_sq" not in state:
                continue
            found = True
            variance = state["exp_avg_sq"].detach().double()
            tensors = (variance, variance.sqrt(), state["exp_avg"].detach().double(),
                       param.detach().double())
            for i, tensor in enumerate(tensors):
                sums[i] += tensor.square().sum().cpu()
                sums[len(NAMES) + i] += tensor.abs().sum().cpu()
                maxima[i] = max(maxima[i], tensor.abs().max().cpu())
    flag = torch.tensor([1.0 if found else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return {}
    groups = [parallel_state.get_tensor_model_parallel_group(),
              parallel_state.get_pipeline_model_parallel_group()]
    if zero_stage > 0:  # partitions of the data-parallel (x context-parallel) ranks
        groups.append(parallel_state.get_data_parallel_group(with_context_parallel=True))
    for group in groups:
        if dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    out = {}
    for i, name in enumerate(NAMES):
        out[f"optimizer/{name}_l2"] = float(sums[i].sqrt())
        out[f"optimizer/{name}_l1"] = float(sums[len(NAMES) + i])
        out[f"optimizer/{name}_abs_max"] = float(maxima[i])
    return out
