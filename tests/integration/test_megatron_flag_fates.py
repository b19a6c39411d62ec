"""Megatron flags that Megatron-LM or Megatron-DeepSpeed run and localopt-train used to refuse:
``--exit-interval`` honoured (stops where Megatron-LM stops, after saving), MoE flags at one
expert (a dense model) and timing flags accepted with a note; MoE with experts stays refused."""

from __future__ import annotations

import pytest
from helpers.configs import PRESET_TRAIN_FLAGS
from helpers.launch import dry_run, run_train

pytestmark = pytest.mark.slow


def test_exit_interval_stops_after_saving_as_megatron(tmp_path):
    """--exit-interval 4 of 6 iterations: 4 iterations, the checkpoint at 4, the losses of a
    run of 4 with the same schedule (--lr-decay-iters 6)."""
    ckpt = tmp_path / "ckpt"
    flags = (*PRESET_TRAIN_FLAGS, "--lr-decay-iters", "6")
    status, setup, err = dry_run([*flags, "--exit-interval", "4"])
    assert status == 0 and setup["exit interval"] == 4, err  # the dry run says where it stops
    stopped = run_train(tmp_path, *flags, "--exit-interval", "4", "--save", str(ckpt),
                        name="exit")
    shorter = run_train(tmp_path, *flags, "--train-iters", "4", name="four")
    assert [r["iteration"] for r in stopped if "lm loss" in r] == [1, 2, 3, 4]
    assert [r["lm loss"] for r in stopped if "lm loss" in r] == [
        r["lm loss"] for r in shorter if "lm loss" in r]
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"


def test_moe_flags_at_one_expert_and_timing_flags_are_accepted():
    status, setup, err = dry_run([*PRESET_TRAIN_FLAGS, "--num-experts", "1", "--moe-loss-coeff",
                                  "0.01", "--topk", "1", "--timing-log-level", "2"])
    assert status == 0, err
    notes = "\n".join(setup["flag notes"])
    assert "--moe-loss-coeff: accepted, the model is dense" in notes
    assert "--topk: accepted" in notes and "--timing-log-level: accepted" in notes
    status, _, err = dry_run([*PRESET_TRAIN_FLAGS, "--num-experts", "8", "--moe-loss-coeff",
                              "0.01"])
    assert status == 2 and "mixture-of-experts layers are not supported" in err


def test_optimizer_states_logged_as_megatron_deepspeed(tmp_path):
    """--log-optimizer-states-to-tensorboard: the last logged momentum and variance norms are
    the saved optimizer state's (recomputed here from the checkpoint), and ZeRO-1 over 2 ranks
    (each holding a partition) logs the single process's values."""
    import torch

    flags = (*PRESET_TRAIN_FLAGS, "--train-iters", "3", "--log-optimizer-states-to-tensorboard")
    ckpt = tmp_path / "ckpt"
    single = run_train(tmp_path, *flags, "--zero-stage", "0", "--save", str(ckpt),
                       name="zero0")
    last = [r for r in single if "optimizer/momentum_l2" in r][-1]
    saved = torch.load(ckpt / "iter_0000003" / "mp_rank_00_model_states.pt",
                       weights_only=False)["optimizer"]["state"]
    momentum = sum(float(s["exp_avg"].double().square().sum()) for s in saved.values())
    variance = sum(float(s["exp_avg_sq"].double().abs().sum()) for s in saved.values())
    assert last["optimizer/momentum_l2"] == pytest.approx(momentum ** 0.5, rel=1e-6)
    assert last["optimizer/variance_l1"] == pytest.approx(variance, rel=1e-6)
    sharded = run_train(tmp_path, *flags, "--zero-stage", "1", nproc=2, name="zero1")
    for key in ("optimizer/momentum_l2", "optimizer/variance_l2", "optimizer/weight_l2",
                "optimizer/momentum_abs_max"):
        assert [r[key] for r in sharded if key in r] == pytest.approx(
            [r[key] for r in single if key in r], rel=1e-4), key
