"""Real 2-rank DeepSpeed runs over gloo, compared with a single process on the same global batch."""

from __future__ import annotations

import math

import pytest
from conftest import REPO, TINY_TRAIN_FLAGS, run_train

pytestmark = pytest.mark.slow

COMMON = TINY_TRAIN_FLAGS


def _losses(records):
    return [r["lm loss"] for r in records]


def test_zero_stages_over_two_ranks_match_single_process(tmp_path):
    single = _losses(run_train(tmp_path, *COMMON, name="single"))
    assert all(math.isfinite(x) for x in single)
    for stage in (1, 2, 3):
        ranks2 = _losses(run_train(
            tmp_path, *COMMON, "--deepspeed_config", str(REPO / f"ds_configs/zero{stage}.json"),
            nproc=2, name=f"zero{stage}"))
        assert ranks2 == pytest.approx(single, rel=2e-5, abs=2e-5), (stage, ranks2, single)
    assert single[-1] < single[0]


def test_bf16_and_tensorboard(tmp_path):
    tb = tmp_path / "tb"
    records = run_train(tmp_path, *COMMON, "--deepspeed_config",
                        str(REPO / "ds_configs/zero1_bf16.json"), "--tensorboard-dir", str(tb),
                        nproc=2, name="bf16")
    assert all(math.isfinite(r["lm loss"]) for r in records)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm loss", "lr", "grad norm", "video tokens/s", "step time (s)",
            "memory (MB)"} <= tags
    assert len(events.Scalars("lm loss")) == 6


@pytest.mark.parametrize("objective", [
    ("--objective", "full-sequence"),
    ("--objective", "local-opt", "--regularizer", "reco", "--reco-weight", "0.1"),
])
def test_pipeline_and_tensor_parallel_match_single_process(tmp_path, objective):
    """PP=2 (DeepSpeed PipelineModule of Megatron layers) and TP=2 (Megatron parallel_state)
    against one process, same global batch; layout-independent init makes them comparable."""
    flags = (*COMMON, *objective, "--zero-stage", "1", "--make-vocab-size-divisible-by", "64",
             "--eval-interval", "6", "--eval-iters", "2")
    keys = ["lm loss", "total loss", "valid full-sequence loss"]
    single = run_train(tmp_path, *flags, name="single")
    for layout in (("--pipeline-model-parallel-size", "2"), ("--tensor-model-parallel-size", "2")):
        records = run_train(tmp_path, *flags, *layout, nproc=2, name="-".join(layout))
        for key in keys:
            got = [r[key] for r in records if key in r]
            want = [r[key] for r in single if key in r]
            assert got == pytest.approx(want, rel=1e-4), (layout, key, got, want)
        assert all(math.isfinite(r["grad norm"]) for r in records)
