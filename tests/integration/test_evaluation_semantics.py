"""Evaluation with Megatron's meaning: ``--eval-iters`` counts global batches under every
layout (DeepSpeed's pipeline included, where fewer than its micro-batches stopped the run), and
a dataset without validation data evaluates nothing (no NaN loss is logged)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.configs import PRESET_TRAIN_FLAGS, train_args
from helpers.launch import dry_run, run_train
from helpers.wds_shards import write_dataset

pytestmark = pytest.mark.slow

# one global batch of 4 samples = 4 micro-batches of 1 on one rank
FLAGS = (*PRESET_TRAIN_FLAGS, "--micro-batch-size", "1", "--global-batch-size", "4",
         "--train-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--zero-stage", "1",
         "--make-vocab-size-divisible-by", "64")


def test_eval_iters_counts_global_batches(tmp_path, dist_world_of_one):
    """The logged validation loss is the mean full-sequence loss of the first global batch (4
    samples) of the validation stream, recomputed here from the saved model; DeepSpeed PP=2
    (4 micro-batches per evaluation round) logs the same."""
    from localopt_plugin.objectives import FullSequence
    from localopt_plugin.plugin import PluginConfig
    from localopt_plugin.training.convert import load_trained_model

    ckpt = tmp_path / "ckpt"
    single = run_train(tmp_path, *FLAGS, "--save", str(ckpt), name="single")
    logged = [r["valid full-sequence loss"] for r in single if "valid full-sequence loss" in r]
    assert len(logged) == 1 and math.isfinite(logged[0])
    model, meta = load_trained_model(str(ckpt))
    source = PluginConfig.from_args(train_args(*FLAGS)).build_dataset()
    stream = source.valid.batches(1, 0, 1, meta["config"]["run"]["seed"])
    full = FullSequence(source.layout)
    with torch.no_grad():
        losses = [full(model, next(stream)["tokens"]).loss.item() for _ in range(4)]
    assert logged[0] == pytest.approx(sum(losses) / 4, rel=1e-5)
    assert logged[0] != pytest.approx(losses[0], rel=1e-5)  # not one micro-batch
    pipeline = run_train(tmp_path, *FLAGS, "--pipeline-model-parallel-size", "2", nproc=2,
                         name="pp2")
    assert [r["valid full-sequence loss"] for r in pipeline
            if "valid full-sequence loss" in r] == pytest.approx(logged, rel=1e-4)


def test_no_validation_data_means_no_evaluation(tmp_path):
    written = write_dataset(tmp_path / "data", 16, 8)
    flags = ("--preset", "test", "--data-path", written.pattern, "--data-num-workers", "0",
             "--micro-batch-size", "2", "--train-iters", "2", "--eval-interval", "1",
             "--log-interval", "1")
    status, setup, err = dry_run(list(flags))
    assert status == 0, err
    assert setup["evaluation"] == "off (no validation data: --valid-data-path)"
    records = run_train(tmp_path, *flags, name="no-valid")
    assert len(records) == 2 and not any("valid full-sequence loss" in r for r in records)
