"""``localopt-train`` whose ReCo gets no halo from the next rank (the pairs that straddle two
ranks' slices are lost). A negative control, run by test_context_parallel: under TP x CP with
sequence parallelism, where the slices run over the tensor x context ranks, it must fail the
comparison with TP."""

import sys

from localopt_plugin.platform import configure_environment

if __name__ == "__main__":
    configure_environment()  # before DeepSpeed is imported
    from localopt_plugin.commands.train import main
    from localopt_plugin.regularizers import reco

    reco.rows_after = lambda tensor, shard, count: tensor[:0]
    sys.exit(main())
