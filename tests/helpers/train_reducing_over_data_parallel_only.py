"""``localopt-train`` whose DeepSpeed mpu lacks the sequence-parallel names, so DeepSpeed reduces
gradients over data-parallel ranks only and the context-parallel ranks step on their own shares
of the gradients. A negative control, run by test_context_parallel: context parallelism broken
this way must fail the comparison with one process."""

import sys

from localopt_plugin.platform import configure_environment

if __name__ == "__main__":
    configure_environment()  # before DeepSpeed is imported
    from localopt_plugin.commands.train import main
    from localopt_plugin.training.distributed import MegatronMpu

    for name in [n for n in vars(MegatronMpu) if "sequence" in n]:
        delattr(MegatronMpu, name)
    sys.exit(main())
