"""Megatron's activation recomputation in localopt-train: the same losses as without it, with
Local Opt. + ReCo on the shipped presets' architecture, over several iterations."""

from __future__ import annotations

import pytest
from helpers.configs import PRESET_TRAIN_FLAGS
from helpers.launch import dry_run, run_train

pytestmark = pytest.mark.slow

FLAGS = (*PRESET_TRAIN_FLAGS, "--objective", "local-opt", "--local-opt-window-scope",
         "micro-batch", "--regularizer", "reco", "--reco-reduction", "mean")


def test_recomputation_gives_the_same_losses(tmp_path):
    keys = ("lm loss", "reco loss", "total loss", "grad norm")
    plain = run_train(tmp_path, *FLAGS, name="plain")
    assert len({r["window start"] for r in plain}) > 1  # windows with context were trained
    for name, flags in (("selective", ("--recompute-activations",)),
                        ("full", ("--recompute-granularity", "full", "--recompute-method",
                                  "uniform", "--recompute-num-layers", "1"))):
        status, setup, stderr = dry_run([*FLAGS, *flags])  # the flags reach the model
        assert status == 0, stderr
        assert setup["recomputation"]["granularity"] == name, setup["recomputation"]
        recomputed = run_train(tmp_path, *FLAGS, *flags, name=name)
        for key in keys:
            assert [r[key] for r in recomputed] == pytest.approx([r[key] for r in plain],
                                                                 rel=1e-5), (name, key)


def test_full_recomputation_under_deepspeed_pipeline_gives_the_same_losses(tmp_path):
    """--recompute-granularity full with DeepSpeed's pipeline (PP=2): Megatron's recomputation
    inside each stage's GPTModel (block here; uniform is the non-pipelined test's and the
    in-process count's below), with dropout on (its RNG replayed in backward), against the same
    PP=2 run without it."""
    flags = (*FLAGS, "--pipeline-model-parallel-size", "2", "--zero-stage", "1",
             "--hidden-dropout", "0.1", "--train-iters", "3")
    plain = run_train(tmp_path, *flags, nproc=2, name="pp-plain")
    for method in ("block",):
        full = ("--recompute-granularity", "full", "--recompute-method", method,
                "--recompute-num-layers", "1")
        status, setup, stderr = dry_run([*flags, *full], world=2)
        assert status == 0 and setup["recomputation"]["method"] == method, stderr
        recomputed = run_train(tmp_path, *flags, *full, nproc=2, name=f"pp-{method}")
        for key in ("lm loss", "reco loss", "grad norm"):
            assert [r[key] for r in recomputed] == pytest.approx([r[key] for r in plain],
                                                                 rel=1e-5), (method, key)


def test_pipeline_stages_run_their_layers_again_in_backward(dist_world_of_one, monkeypatch):
    """What the test above cannot see from losses: with full recomputation each transformer
    layer of a pipeline stage runs its forward a second time during backward (once without)."""
    import torch
    from helpers.configs import preset_model
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from localopt_plugin.data.layout import SampleLayout
    from localopt_plugin.model import ParallelConfig
    from localopt_plugin.objectives import FullSequence
    from localopt_plugin.training.pipeline import build_pipeline_module

    calls = []
    forward = TransformerLayer.forward
    monkeypatch.setattr(TransformerLayer, "forward",
                        lambda self, *a, **k: calls.append(self) or forward(self, *a, **k))
    layout = SampleLayout(video_start=3, num_frames=2, frame_tokens=8)
    tokens = torch.randint(0, 40, (2, layout.seq_length))
    for recompute, expected in ((None, 1), (1, 2)):
        model = preset_model(recompute_granularity="full" if recompute else None,
                             recompute_method="uniform" if recompute else None,
                             recompute_num_layers=recompute)
        module = build_pipeline_module(model, ParallelConfig(), 48, seed=1234)
        inputs, labels = module.feed(FullSequence(layout).plan(tokens))
        calls.clear()
        module.loss_fn(module(inputs), labels).backward()
        assert len(calls) == expected * model.num_layers, (recompute, len(calls))
