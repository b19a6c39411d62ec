"""The first iteration's gradients of two trainers' checkpoints, for comparison (run in the
Megatron-LM environment): localopt-train's at iteration 0 and 1, and Megatron-LM's
``--ckpt-format torch`` one at iteration 1. Both took one plain SGD step with learning rate 1
from the same initial weights, so a gradient is ``weights at 0 - weights at 1``.

Usage: first_step_grads.py LOCALOPT_DIR_0 LOCALOPT_DIR_1 MEGATRON_DIR OUT.pt
"""

from __future__ import annotations

import sys

import torch

from localopt_plugin.training.convert import load_trained_model
from localopt_plugin.training.distributed import init_distributed


def main(initial: str, localopt: str, megatron: str, out: str) -> None:
    init_distributed()
    start = load_trained_model(initial)[0].state_dict()
    after = load_trained_model(localopt)[0].state_dict()
    megatron_after = torch.load(f"{megatron}/iter_0000001/mp_rank_00/model_optim_rng.pt",
                                map_location="cpu", weights_only=False)["model"]
    weights = [name for name, value in start.items()
               if isinstance(value, torch.Tensor) and torch.is_floating_point(value)]
    torch.save({"localopt-train": {n: start[n] - after[n] for n in weights},
                "pretrain": {n: start[n] - megatron_after[n] for n in weights}}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
