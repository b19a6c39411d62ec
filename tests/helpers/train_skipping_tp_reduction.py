"""``localopt-train`` with Megatron's tensor-parallel all-reduce after each row-parallel layer
switched off: each rank goes on with its partial sums. A negative control, run by
test_distributed: a tensor-parallel layout broken this way must fail the comparison with the
single process."""

import sys

from localopt_plugin.platform import configure_environment

if __name__ == "__main__":
    configure_environment()  # before DeepSpeed is imported
    from megatron.core.tensor_parallel import layers

    from localopt_plugin.commands.train import main

    layers.reduce_from_tensor_model_parallel_region = lambda tensor, *args, **kwargs: tensor
    sys.exit(main())
