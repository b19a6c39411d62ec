"""``localopt-train`` with DeepSpeed's data-parallel gradient reduction switched off: each rank
steps on its own micro-batch's gradient. A negative control, run by test_distributed: a layout
broken this way must fail the comparison with the single process."""

import sys

from localopt_plugin.platform import configure_environment

if __name__ == "__main__":
    configure_environment()  # before DeepSpeed is imported
    from deepspeed.runtime.engine import DeepSpeedEngine

    from localopt_plugin.commands.train import main

    DeepSpeedEngine.allreduce_gradients = lambda self, *args, **kwargs: None
    sys.exit(main())
