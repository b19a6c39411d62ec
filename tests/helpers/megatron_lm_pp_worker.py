"""One rank of a 2-stage Megatron-Core pipeline running LocalOptForwardStep (under torchrun).

Usage: megatron_lm_pp_worker.py OUT_DIR OBJECTIVE...; writes OUT_DIR/rank{r}.pt with, per
objective, the per-micro-batch reports (last stage) and this stage's gradients under their
whole-model names. ``LOCALOPT_TEST_PERTURB=dropped-context`` (a negative control) replaces the
context rows a stage receives with zeros.
"""

from __future__ import annotations

import os
import sys

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from helpers.configs import tiny_args
from localopt_plugin import megatron_lm
from localopt_plugin.megatron_lm import (
    LocalOptForwardStep,
    build_datasets,
    build_model,
    video_source,
)
from localopt_plugin.model import ModelConfig, ParallelConfig, transformer_config
from localopt_plugin.model.init import canonical_parameters
from localopt_plugin.training.distributed import init_distributed

MICRO_BATCHES = 2


def _drop_received_context() -> None:
    """What a bug losing the context stream between stages would do."""
    real = megatron_lm.plan_hidden

    def dropped(model, plan):
        received = model.decoder.input_tensor
        if not model.pre_process and plan.context_ids is not None:
            rows = plan.context_ids.shape[1]
            model.decoder.set_input_tensor(
                torch.cat([torch.zeros_like(received[:rows]), received[rows:]]))
        return real(model, plan)

    megatron_lm.plan_hidden = dropped


def main(out_dir: str, objectives: list[str]) -> None:
    init_distributed(ParallelConfig(pipeline_model_parallel_size=2), seed=1234)
    if os.environ.get("LOCALOPT_TEST_PERTURB") == "dropped-context":
        _drop_received_context()
    rank = parallel_state.get_pipeline_model_parallel_rank()
    results = {}
    for objective in objectives:  # a name, then any of its flags ("local-opt --flag value")
        name, *extra = objective.split()
        args = tiny_args("--objective", name, *extra, "--regularizer", "reco",
                         "--reco-states", "pre-norm", "--local-opt-window-scope", "micro-batch",
                         "--pipeline-model-parallel-size", "2", "--micro-batch-size", "2")
        layout = video_source(args).layout
        args.seq_length = layout.label_span(0, layout.num_frames)[1]  # full-sequence length
        config = transformer_config(ModelConfig.from_args(args), ParallelConfig.from_args(args))
        model = build_model(args, config,
                            video_source(args).vocab.size, pre_process=rank == 0,
                            post_process=rank == 1)
        model.config.variable_seq_lengths = True  # as model_provider sets it under PP
        train, _, _ = build_datasets(args)
        reports = get_forward_backward_func()(
            forward_step_func=LocalOptForwardStep(args), data_iterator=train, model=[model],
            num_microbatches=MICRO_BATCHES, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=False)
        results[objective] = {
            "reports": [{k: v.tolist() for k, v in r.items()} for r in reports],
            "grads": {name: p.grad.clone() for name, p in canonical_parameters(model)
                      if p.grad is not None},
        }
    torch.save(results, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
