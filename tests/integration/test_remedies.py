"""Local Opt.'s remedies for long-range recall (the adaptive window sampler, a share of
full-sequence steps, several windows per context pass) under the parallel layouts users run:
real 2-rank runs over gloo with the shipped presets' architecture, against one process on the
same global batch; and a resumed run against an uninterrupted one (the sampler's learned
losses travel in the checkpoint)."""

from __future__ import annotations

import pytest
from helpers.configs import PRESET_TRAIN_FLAGS
from helpers.launch import run_train

pytestmark = pytest.mark.slow

# W = 1 on 3 frames: the adaptive sampler chooses between two later windows
REMEDIES = ("--objective", "local-opt", "--local-opt-window-frames", "1",
            "--window-sampler", "adaptive", "--local-opt-adaptive-decay", "0.5",
            "--local-opt-full-sequence-share", "0.3", "--regularizer", "reco",
            "--reco-reduction", "mean", "--reco-states", "pre-norm")
SAME_VOCAB = ("--make-vocab-size-divisible-by", "64")
KEYS = ("lm loss", "reco loss", "window start", "full-sequence step")


def _values(records, key):
    return [r[key] for r in records if key in r]


def test_remedies_under_every_layout_match_one_process(tmp_path):
    """DP=2 (ZeRO-1), TP=2, DeepSpeed PP=2 and CP=2 draw the single process's windows and
    full-sequence steps and train the same losses. The adaptive draws follow the losses: with
    another seed's losses fed back (negative control) the draws differ."""
    flags = (*PRESET_TRAIN_FLAGS, "--train-iters", "10", *REMEDIES, "--zero-stage", "1",
             *SAME_VOCAB)
    single = run_train(tmp_path, *flags, name="single")
    windows = [r["window start"] for r in single if r["full-sequence step"] == 0]
    assert 0 < sum(r["full-sequence step"] for r in single) < len(single)
    assert {1, 2} <= set(windows)  # both later windows were tried
    for layout in ((),
                   ("--tensor-model-parallel-size", "2"),
                   ("--pipeline-model-parallel-size", "2"),
                   ("--context-parallel-size", "2", "--cp-comm-type", "a2a")):
        name = "-".join(layout).strip("-") or "dp2"
        records = run_train(tmp_path, *flags, *layout, nproc=2, name=name)
        for key in KEYS:
            assert _values(records, key) == pytest.approx(_values(single, key), rel=1e-4), (
                layout, key)


def test_several_windows_per_context_pass_under_every_layout_match_one_process(tmp_path):
    """``--local-opt-windows-per-step 2`` with ReCo: TP=2, DeepSpeed PP=2 and CP=2 train the
    single process's losses (the windows: one per draw, each its own attention and ReCo
    pairs, in every executor's stages and shards)."""
    flags = (*PRESET_TRAIN_FLAGS, "--train-iters", "4", "--objective", "local-opt",
             "--local-opt-window-frames", "1", "--local-opt-windows-per-step", "2",
             "--regularizer", "reco", "--reco-reduction", "mean", "--zero-stage", "1",
             *SAME_VOCAB)
    single = run_train(tmp_path, *flags, name="single")
    # the windows were drawn apart in some steps: two windows trained, not one
    assert any(r["latest window start"] != r["window start"] for r in single)
    for layout in (("--tensor-model-parallel-size", "2"),
                   ("--pipeline-model-parallel-size", "2"),
                   ("--context-parallel-size", "2", "--cp-comm-type", "a2a")):
        records = run_train(tmp_path, *flags, *layout, nproc=2, name="-".join(layout))
        for key in ("lm loss", "reco loss", "window start", "latest window start"):
            assert _values(records, key) == pytest.approx(_values(single, key), rel=1e-4), (
                layout, key)


def test_adaptive_run_resumes_exactly(tmp_path):
    """Saved at iteration 4 and resumed: the windows and losses of the uninterrupted run (the
    smoothed losses come back from the checkpoint; a sampler starting afresh would draw as
    the first iterations did)."""
    flags = (*PRESET_TRAIN_FLAGS, *REMEDIES, "--lr-decay-iters", "8", "--zero-stage", "1")
    whole = run_train(tmp_path, *flags, "--train-iters", "8", name="whole")
    ckpt = str(tmp_path / "ckpt")
    run_train(tmp_path, *flags, "--train-iters", "4", "--save", ckpt, "--save-interval", "4",
              name="first")
    resumed = run_train(tmp_path, *flags, "--train-iters", "8", "--load", ckpt, name="resumed")
    for key in KEYS:
        assert _values(resumed, key) == _values(whole, key)[4:], key
