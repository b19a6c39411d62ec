"""`localopt-bench recall-tokens` end to end at a few steps (no claim asserted): the real
trainer per variant, every checkpoint scored by `localopt-eval recall-tokens`; the FLOPs of each
run are its logged windows replayed (an adaptive sampler's included), the figures read at a
share of full-sequence's FLOPs lie on each run's curve, and a rerun reuses finished runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.launch import REPO, subprocess_env

pytestmark = pytest.mark.slow


def _bench(out, *extra):
    cmd = [sys.executable, "-m", "localopt_plugin.commands.bench", "recall-tokens",
           "--out", str(out), "--seeds", "1", "--full-steps", "6", "--checkpoints", "3",
           "--model", "test", "--budget", "0.6", "--variants", "local-opt + adaptive", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout, json.loads((out / "results.json").read_text())


def test_recall_tokens_bench_machinery(tmp_path):
    from localopt_plugin.bench.recall_tokens import VARIANTS, read_at

    out = tmp_path / "bench"
    stdout, result = _bench(out)
    assert [r["variant"] for r in result["runs"]] == ["full-sequence", "local-opt + adaptive"]
    full, adaptive = result["runs"]
    assert full["compute / full-sequence"] == pytest.approx(1.0)
    assert adaptive["compute / full-sequence"] >= 0.6  # trained to at least its budget
    for run in result["runs"]:
        slug = next(v.slug for v in VARIANTS if v.name == run["variant"])
        scores = json.loads((out / "seed1" / slug / "scores.json").read_text())["checkpoints"]
        assert [s for _, s in run["curve"]] == scores
        xs = [x for x, _ in run["curve"]]
        assert xs == sorted(xs) and len(xs) >= 3
        assert all(0 <= s["recall accuracy"] <= 1 for s in scores)
        assert run["recall accuracy at 0.5x"] == read_at(run["curve"], 0.5, "recall accuracy")
    # the figure at 0.5x lies between the two checkpoints around it
    curve = adaptive["curve"]
    (_, s0), (_, s1) = next((a, b) for a, b in zip(curve, curve[1:], strict=False)
                            if a[0] <= 0.5 <= b[0])
    low, high = sorted((s0["recall accuracy"], s1["recall accuracy"]))
    assert low <= adaptive["recall accuracy at 0.5x"] <= high
    draws = adaptive["windows"]["draws per start"]
    assert sum(draws.values()) == adaptive["steps"]  # no full-sequence steps in this variant
    assert "recall accuracy at 0.5x" in (out / "results.md").read_text()
    stdout, again = _bench(out)
    assert stdout.count("reusing") == 2 and again["runs"] == result["runs"]
