"""Bad samples surface in the run's metrics, TensorBoard and final summary, summed over the
data-parallel ranks; --data-path takes globs as well as brace ranges."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections import Counter

import pytest
from helpers.configs import train_args
from helpers.launch import REPO, TRAIN_MODULE, subprocess_env
from helpers.wds_shards import write_dataset

from localopt_plugin.data.wds import VideoWdsConfig, video_wds
from localopt_plugin.data.wds.samples import MISSING_TOKENS

pytestmark = pytest.mark.slow

ITERS = 6


def _drop_tokens(i, sample):
    if i in (2, 9):  # one bad sample in the first and in the third shard
        sample.pop("tokens.npy")


def _expected_skips(pattern: str, flags: tuple[str, ...]) -> Counter:
    """What both ranks' loaders skip over the run, read here rank by rank in one process."""
    args = train_args(*flags)
    total: Counter = Counter()
    for rank in (0, 1):
        source = video_wds(VideoWdsConfig.from_args(args), seed=args.seed)
        stream = source.train.batches(2, rank, 2, args.seed)
        for _ in itertools.islice(stream, ITERS):
            pass
        total.update(source.train.skipped_samples())
    return total


def test_skipped_samples_reach_metrics_tensorboard_and_summary(tmp_path):
    written = write_dataset(tmp_path / "data", 16, 4, mutate=_drop_tokens)
    data = ("--dataset", "video-wds", "--data-path", written.pattern, "--data-num-workers", "0",
            "--max-bad-sample-fraction", "0.5")
    flags = ("--preset", "test", "--micro-batch-size", "2", "--global-batch-size", "4",
             "--train-iters", str(ITERS), "--log-interval", "3", *data)
    metrics, tb = tmp_path / "metrics.jsonl", tmp_path / "tb"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", TRAIN_MODULE, *flags, "--metrics-file", str(metrics),
           "--tensorboard-dir", str(tb)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    import json

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    logged = [r for r in records if "skipped samples" in r]
    assert [r["iteration"] for r in logged] == [3, 6]
    expected = _expected_skips(pattern=written.pattern, flags=flags)
    assert expected[MISSING_TOKENS] >= 2  # both bad samples were read
    last = logged[-1]
    assert last["skipped samples"] == sum(expected.values())
    assert last[f"skipped: {MISSING_TOKENS}"] == expected[MISSING_TOKENS]
    assert f"skipped samples {sum(expected.values())}" in proc.stderr.split(
        "training finished:")[1]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    assert events.Scalars("skipped samples")[-1].value == sum(expected.values())
    assert f"skipped: {MISSING_TOKENS}" in events.Tags()["scalars"]


def test_data_path_accepts_globs(tmp_path):
    written = write_dataset(tmp_path / "data", 12, 4)
    by_brace = video_wds(VideoWdsConfig(data_path=(written.pattern,), num_workers=0))
    by_glob = video_wds(VideoWdsConfig(data_path=(str(tmp_path / "data" / "d-*.tar"),),
                                       num_workers=0))
    brace_batches = list(itertools.islice(by_brace.train.batches(4, 0, 1, 3), 3))
    glob_batches = list(itertools.islice(by_glob.train.batches(4, 0, 1, 3), 3))
    assert [b["keys"] for b in glob_batches] == [b["keys"] for b in brace_batches]
    with pytest.raises(ValueError, match="matches no file"):
        video_wds(VideoWdsConfig(data_path=(str(tmp_path / "data" / "x-*.tar"),)))
