"""Context-parallel flags as users write them (dry runs of localopt-train, in this process):
Megatron's --context-parallel-size / --cp-comm-type and Megatron-DeepSpeed's
--ds-sequence-parallel-size are honoured or refused naming the fix; the sequence split and
halo exchange cover every row once."""

from __future__ import annotations

import json

import pytest
from helpers.configs import PRESET_TRAIN_FLAGS
from helpers.launch import dry_run

from localopt_plugin.model.context_parallel import (
    SequenceShard,
    replicate_groups,
    split_sizes,
)

CP2 = ("--context-parallel-size", "2")


def _layout(*flags: str, world: int = 2):
    status, setup, stderr = dry_run([*PRESET_TRAIN_FLAGS, *flags], world=world)
    return status, (setup or {}).get("parallel layout (tp, pp, cp, dp)"), stderr


def test_context_parallel_layouts_and_the_ulysses_alias():
    assert _layout(*CP2, "--cp-comm-type", "a2a")[1] == [1, 1, 2, 1]
    assert _layout(*CP2, "--cp-comm-type", "a2a", world=4)[1] == [1, 1, 2, 2]
    assert _layout(*CP2, "--cp-comm-type", "a2a", "--tensor-model-parallel-size", "2",
                   world=4)[1] == [2, 1, 2, 1]
    status, layout, _ = _layout("--ds-sequence-parallel-size", "2")
    assert (status, layout) == (0, [1, 1, 2, 1])
    status, setup, _ = dry_run([*PRESET_TRAIN_FLAGS, "--sequence-parallel",
                                "--tensor-model-parallel-size", "2"], world=2)
    assert setup["parallel layout (tp, pp, cp, dp)"] == [2, 1, 1, 1]
    assert setup["sequence parallel"] is True
    status, setup, _ = dry_run([*PRESET_TRAIN_FLAGS, "--sequence-parallel",
                                "--tensor-model-parallel-size", "2", *CP2, "--cp-comm-type",
                                "a2a"], world=4)
    assert (setup["parallel layout (tp, pp, cp, dp)"], setup["sequence parallel"]) == (
        [2, 1, 2, 1], True)


def test_zero3_reduce_scatter_off_refused_with_context_parallelism(tmp_path):
    """DeepSpeed's ZeRO-3 with reduce_scatter false mixes two scalings of the context-parallel
    shares: the dry run refuses it, naming the key."""
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2,
                                  "zero_optimization": {"stage": 3, "reduce_scatter": False}}))
    status, _, stderr = _layout(*CP2, "--cp-comm-type", "a2a", "--deepspeed_config",
                                str(config))
    assert status != 0 and "zero_optimization.reduce_scatter" in stderr, stderr[-2000:]
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2,
                                  "zero_optimization": {"stage": 3}}))
    assert _layout(*CP2, "--cp-comm-type", "a2a", "--deepspeed_config", str(config))[0] == 0


@pytest.mark.parametrize(("flags", "words"), [
    # Megatron's default --cp-comm-type is p2p (ring), which the plugin does not run
    (CP2, "pass --cp-comm-type a2a"),
    ((*CP2, "--cp-comm-type", "p2p"), "pass --cp-comm-type a2a"),
    (("--context-parallel-size", "3", "--cp-comm-type", "a2a"),
     "does not split over --context-parallel-size 3"),
    (("--ds-sequence-parallel-size", "2", "--context-parallel-size", "4"), "contradicts"),
    (("--ds-sequence-parallel-size", "2", "--cp-comm-type", "p2p"), "contradicts"),
])
def test_context_parallel_settings_refused_with_the_fix(flags, words):
    status, _, stderr = _layout(*flags, world=6 if "3" in flags else 4)
    assert status != 0 and words in stderr, stderr[-2000:]


def test_context_and_sequence_parallelism_with_deepspeeds_pipeline_are_accepted():
    """(Trained against one process in tests/integration/test_distributed.py.)"""
    status, setup, stderr = dry_run([*PRESET_TRAIN_FLAGS, *CP2, "--cp-comm-type", "a2a",
                                     "--pipeline-model-parallel-size", "2"], world=4)
    assert status == 0 and setup["parallel layout (tp, pp, cp, dp)"] == [1, 2, 2, 1], stderr
    # what DeepSpeed's pipeline grid is given (it counts context ranks as data ranks), not the
    # global batch, which stays as the flags say
    assert setup["micro batch, global batch, accumulation"] == [2, 4, 2]
    assert setup["deepspeed"]["train_batch_size"] == 4 * 2
    assert any("train_batch_size 4 x 2" in note for note in setup["deepspeed notes"]), setup
    status, setup, stderr = dry_run([*PRESET_TRAIN_FLAGS, "--sequence-parallel",
                                     "--tensor-model-parallel-size", "2",
                                     "--pipeline-model-parallel-size", "2"], world=4)
    assert status == 0, stderr[-2000:]
    assert any("pipe_partitioned" in note for note in setup["deepspeed notes"]), setup


def test_world_not_divisible_by_the_context_parallel_layout():
    status, _, stderr = _layout(*CP2, "--cp-comm-type", "a2a", world=3)
    assert status != 0 and "context parallel size" in stderr, stderr[-2000:]


@pytest.mark.parametrize(("length", "world"), [(35, 2), (35, 4), (7, 4), (64, 4)])
def test_sequence_split_covers_every_row_once(length, world):
    """(Sizes and offsets only: no process group is used.)"""
    sizes = split_sizes(length, world)
    shards = [SequenceShard(None, sizes, rank) for rank in range(world)]
    rows = [i for s in shards for i in range(s.start, s.stop)]
    assert rows == list(range(length))
    assert max(s.sizes[s.rank] for s in shards) - min(s.sizes[s.rank] for s in shards) <= 1
    for first in (0, 3, length - 1):
        optimized = [s.between(first) for s in shards]
        kept = [i for s, o in zip(shards, optimized, strict=True)
                for i in range(s.stop - o.sizes[o.rank], s.stop)]
        assert kept == list(range(first, length))


def test_replicated_groups_keep_each_query_head_with_its_group():
    import torch

    key = torch.arange(2.0).view(1, 1, 2, 1).expand(3, 1, 2, 1)  # groups 0 and 1
    heads = 8
    for cp in (4, 8):
        replicated = replicate_groups(key, heads, cp)
        assert replicated.shape[2] % cp == 0
        per_group = heads // replicated.shape[2]
        for head in range(heads):  # query head h meets group h // (heads / groups)
            assert replicated[0, 0, head // per_group, 0] == head // (heads // 2)
