"""The speed benchmark's memory measure (its smoke run is the GPU check's rehearsal:
test_gpu_check.py) and its context-parallel form; the map-style batch source; the pipeline
benchmark's counts."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch
from helpers.launch import REPO, subprocess_env

from localopt_plugin.bench.speed import peak_allocated_bytes, peak_of_allocations
from localopt_plugin.data.source import MapStyleSource


def test_peak_allocated_bytes_is_the_allocator_peak():
    """Live tensors at the peak count, whatever holds them (not only autograd's saves)."""
    def fn():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(2_000_000)  # 8 MB: 12 MB live, the peak
        del a
        c = torch.empty(500_000)  # 2 MB: 10 MB live
        return b, c

    peak = peak_allocated_bytes(fn)
    assert 12_000_000 <= peak < 12_000_000 + 4096, peak
    held = [torch.empty(3_000_000)]  # held before: not counted, nor is its free
    assert peak_allocated_bytes(lambda: torch.empty(250_000)) < 1_001_000
    assert 1_000_000 <= peak_allocated_bytes(lambda: (held.pop(), torch.empty(250_000))) < (
        1_001_000)


def test_a_free_the_profiler_missed_ends_when_the_address_is_reused():
    """A collective's buffer freed on gloo's worker thread leaves no free event: its address
    handed out again means it was freed by then (the old accounting kept both allocations)."""
    mb = 2**20
    events = [(0, 4 * mb, 0xA), (1, 8 * mb, 0xB),  # 12 MB live
              (2, 6 * mb, 0xA),  # 0xA again, its free unseen: 14 MB live, not 18
              (3, -8 * mb, 0xB), (4, -6 * mb, 0xA), (5, -3 * mb, 0xC)]  # 0xC: from before
    assert peak_of_allocations(events) == 14 * mb
    assert peak_of_allocations(reversed(events)) == 14 * mb  # ordered by time
    assert peak_of_allocations([(0, 4 * mb, 0xA), (1, 1 * mb, 0xD)]) == 5 * mb  # never reused


def test_context_parallel_speed_benchmark_reports_its_rows(tmp_path):
    """``localopt-bench speed --context-parallel-size 2 --zero-stage 2`` (a small model) launches
    its CP=1 and CP=2 measurements itself and reports per row and in total the ratios of its own
    rows: the expected Local Opt. step is recomputed here from the rows and the sampler's
    probabilities."""
    out = tmp_path / "cp.json"
    model = ("--model-flags=--num-layers 1 --hidden-size 64 --ffn-hidden-size 128 "
             "--num-attention-heads 4 --num-query-groups 2")
    proc = subprocess.run(
        [sys.executable, "-m", "localopt_plugin.commands.bench", "speed", "--preset", "paper17",
         "--context-parallel-size", "2", "--zero-stage", "2", "--repeats", "3", "--warmup", "0",
         model, "--json", str(out)], cwd=REPO, env=subprocess_env(), capture_output=True,
        text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "CP=2 / CP=1 local-opt worst-window peak" in proc.stdout
    result = json.loads(out.read_text())
    assert result["ZeRO stage"] == 2 and "ZeRO-2" in proc.stdout
    rows = result["rows"]
    assert [r["window start"] for r in rows] == [None, 0, 1, 2, 3]
    probabilities = {int(k): v for k, v in result["window probabilities"].items()}
    assert sum(probabilities.values()) == pytest.approx(1)
    for cp in (1, 2):
        expected = sum(probabilities[r["window start"]] * r[f"CP={cp} median step (ms)"]
                       for r in rows[1:]) / 1e3
        assert result[f"CP={cp}"]["local-opt expected step"] == pytest.approx(expected)
    assert result["ratios"]["full-sequence peak"] == pytest.approx(rows[0]["memory ratio"])
    worst = max(r["CP=2 peak per rank (MB)"] for r in rows[1:]) / max(
        r["CP=1 peak (MB)"] for r in rows[1:])
    assert result["ratios"]["local-opt worst-window peak"] == pytest.approx(worst)
    assert set(result["targets"]) == {"full-sequence peak", "local-opt worst-window peak",
                                      "full-sequence step", "local-opt expected step"}
    # the informational ratio takes out what CP cannot split: the optimizer step (both sizes)
    # and the gradient all-reduce (timed alone, CP=2 only)
    reduction = result["CP=2 gradient all-reduce (s)"]
    assert reduction > 0
    one, two = result["CP=1"], result["CP=2"]
    rest = ((two["full-sequence step"] - two["full-sequence optimizer step"] - reduction)
            / (one["full-sequence step"] - one["full-sequence optimizer step"]))
    assert result["step ratios without the optimizer step and the gradient all-reduce"][
        "full-sequence step"] == pytest.approx(rest)
    assert "step ratios without them" in proc.stdout
    # what CP adds, counted from the attention (1 layer): queries, keys, values there and the
    # output back, once forward and once backward in a pass with autograd; the context pass
    # of a window after frame 0 adds its forward's four
    assert [r["CP=2 all-to-alls per step"] for r in rows] == [8, 8, 12, 12, 12]
    assert all(r["CP=2 all-to-alls alone (ms)"] > 0 for r in rows)
    computation = ((two["full-sequence step"] - two["full-sequence optimizer step"] - reduction
                    - two["full-sequence all-to-alls"])
                   / (one["full-sequence step"] - one["full-sequence optimizer step"]
                      - one["full-sequence all-to-alls"]))
    assert result["step ratios without the optimizer step, the gradient all-reduce and the "
                  "all-to-alls"]["full-sequence step"] == pytest.approx(computation)
    assert "the computation (informational)" in proc.stdout
    # the machine's floor: CP=1 run twice at once, each step / 2, against CP=1 alone
    floors = result["step ratio floors (CP=1 2 at once / 2 / CP=1 alone)"]
    assert floors["full-sequence step"] == pytest.approx(
        rows[0]["CP=1, 2 at once median step (ms)"] / 2 / rows[0]["CP=1 median step (ms)"])
    loaded = sum(probabilities[r["window start"]] * r["CP=1, 2 at once median step (ms)"]
                 for r in rows[1:]) / 1e3
    assert result["CP=1, 2 at once"]["local-opt expected step"] == pytest.approx(loaded)
    assert "this machine's floor" in proc.stdout


class _Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        return {"tokens": torch.tensor([i])}


def _take(source, n, **kw):
    return [b["tokens"].view(-1).tolist() for b in itertools.islice(source.batches(**kw), n)]


@pytest.mark.parametrize(("flags", "words"), [
    (("--zero-stage", "2"), "--context-parallel-size N > 1"),
    (("--context-parallel-size", "2", "--reduce-bucket-size", "1000000"), "--zero-stage 1 or 2"),
])
def test_speed_engine_settings_refused_where_not_used(capsys, flags, words):
    """The ZeRO settings of the context-parallel comparison are refused where nothing would
    read them (the single-process rows run ZeRO-0; DeepSpeed reads the bucket in stages 1-2)."""
    from localopt_plugin.commands.bench import main

    assert main(["speed", "--preset", "paper17", *flags]) == 2
    assert words in capsys.readouterr().err


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


def test_pipeline_benchmark_counts_what_crosses_the_stages(tmp_path):
    """``localopt-bench pipeline`` (2 ranks, Megatron-Core's 1F1B schedule) counts, per window,
    the rows the layout says cross the stages: context + prefix + window rows forward, the same
    back as gradients, and the kept context keys/values of the stage's layer; full-sequence's
    rows are the sample's input up to its last video token."""
    out = tmp_path / "pipeline.json"
    subprocess.run([sys.executable, "-m", "localopt_plugin.commands.bench", "pipeline",
                    "--preset", "test", "--frame-tokens", "16", "--json", str(out)],
                   cwd=REPO, env=subprocess_env(), check=True, capture_output=True, timeout=300)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    prefix, tokens, hidden, groups, head_dim = 2, 16, 64, 2, 16  # preset "test", 5 frames
    mib = 2**20
    for start in range(4):
        context = prefix + start * tokens if start else 0
        crossing = context + prefix + 2 * tokens
        row = rows[f"window {start}"]
        assert row["forward MiB (stage 0 -> 1)"] * mib == crossing * hidden * 4
        assert row["gradient MiB (stage 1 -> 0)"] == row["forward MiB (stage 0 -> 1)"]
        kept = max(context - prefix, 0) * groups * head_dim * 2 * 4  # one layer a stage
        assert row["kept context K/V MiB (per stage)"] * mib == kept
    full = rows["full-sequence"]
    assert full["forward MiB (stage 0 -> 1)"] * mib == (prefix + 5 * tokens) * hidden * 4
    expected = rows["local-opt, expected over draws"]["forward MiB (stage 0 -> 1)"]
    # balanced draws: window 0 with p = 0.5, the other three with 1/6 each
    assert expected == pytest.approx(0.5 * rows["window 0"]["forward MiB (stage 0 -> 1)"]
                                     + sum(rows[f"window {s}"]["forward MiB (stage 0 -> 1)"]
                                           for s in (1, 2, 3)) / 6)
