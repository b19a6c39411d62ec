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
