"""``localopt-train`` whose sequence-parallel norms keep each tensor-parallel rank's share of
their weights' gradients (the sum over ranks skipped). A negative control, run by
test_distributed: sequence parallelism broken this way must fail the comparison with TP."""

import sys

from localopt_plugin.platform import configure_environment

if __name__ == "__main__":
    configure_environment()  # before DeepSpeed is imported
    from localopt_plugin.commands.train import main
    from localopt_plugin.model import sequence_parallel

    sequence_parallel._SumGradientOverTensorParallel.backward = staticmethod(
        lambda ctx, grad: (grad, None))
    sys.exit(main())
