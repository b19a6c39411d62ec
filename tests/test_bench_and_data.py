"""The speed benchmark's memory measure and a smoke run; the map-style batch source."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import torch
from conftest import REPO, subprocess_env

from localopt_plugin.bench.speed import saved_activation_bytes
from localopt_plugin.data.source import MapStyleSource


def test_saved_activation_bytes_counts_distinct_non_parameter_storages():
    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    params = {w.untyped_storage().data_ptr()}

    def fn():
        h = x @ w          # saves x (and w, a parameter: excluded)
        return (h * h).sum()  # saves h once although it is used twice
    nbytes, _ = saved_activation_bytes(fn, params)
    assert nbytes == x.nbytes + 4 * 8 * 4
    with torch.no_grad():
        assert saved_activation_bytes(fn, params)[0] == 0


def test_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [sys.executable, "-m", "localopt_plugin.bench.cli", "speed", "--preset", "paper17",
         "--steps", "5", "--warmup", "1", "--json", str(out),
         "--model-flags", "--num-layers 1 --hidden-size 32 --num-attention-heads 2"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| local-opt |" in proc.stdout and "local-opt targets" in proc.stdout
    result = json.loads(out.read_text())
    rows = {r["objective"]: r for r in result["rows"]}
    assert set(rows) == {"full-sequence", "local-opt", "fewer-frames"}
    assert rows["full-sequence"]["time ratio"] == 1.0
    # memory is deterministic: a W=2 window of 5 frames keeps far less than the full sequence
    assert rows["local-opt"]["memory ratio"] < 0.8


class _Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        return {"tokens": torch.tensor([i])}


def _take(source, n, **kw):
    return [b["tokens"].view(-1).tolist() for b in itertools.islice(source.batches(**kw), n)]


def test_map_style_source_splits_ranks_and_resumes_exactly():
    source = MapStyleSource(_Indices())
    kw = {"micro_batch_size": 2, "dp_size": 2, "seed": 5}
    rank0, rank1 = _take(source, 5, dp_rank=0, **kw), _take(source, 5, dp_rank=1, **kw)
    epoch = sorted(sum(rank0 + rank1, []))
    assert epoch == list(range(20))  # disjoint and covering one epoch
    resumed = _take(source, 3, dp_rank=0, consumed_samples=8, **kw)
    assert resumed == _take(source, 5, dp_rank=0, **kw)[2:5]
    across_epoch = _take(source, 4, dp_rank=0, consumed_samples=16, **kw)
    assert across_epoch == _take(source, 8, dp_rank=0, **kw)[4:8]
