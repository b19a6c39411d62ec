"""`localopt-bench quality` end to end on a tiny budget: every run trains, is evaluated and
lands in the tables (the figures themselves are recorded in docs/RESULTS.md, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.launch import REPO, subprocess_env

pytestmark = pytest.mark.slow


def test_quality_bench_smoke(tmp_path):
    shards = tmp_path / "shards"
    for split, videos, seed in (("train", 16, 0), ("valid", 8, 900)):
        subprocess.run([sys.executable, "-m", "localopt_plugin.commands.preprocess",
                        f"procedural:{videos}:{seed}", "--output", str(shards / split),
                        "--videos-per-shard", "8", "--no-progress"],
                       check=True, cwd=REPO, env=subprocess_env(), capture_output=True)
    out = tmp_path / "quality"
    proc = subprocess.run(
        [sys.executable, "-m", "localopt_plugin.commands.bench", "quality", "--preset", "cpu",
         "--iters", "2", "--data-path", str(shards / "train/train-{000000..000001}.tar"),
         "--valid-data-path", str(shards / "valid/train-000000.tar"), "--out", str(out),
         "--variants", "fewer-frames", "local-opt + balance + ReCo"],
        cwd=REPO, capture_output=True, text=True, timeout=1500, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads((out / "results.json").read_text())
    same = {r["variant"]: r for r in result["same steps"]}
    assert set(same) == {"full-sequence", "fewer-frames", "local-opt + balance + ReCo"}
    assert all(r["steps"] == 2 for r in same.values())
    for row in result["same steps"] + result["equal compute"]:
        assert len(row["NLL per frame"]) == 5 and row["flow warp error"] > 0
        assert row["late-frame NLL"] == row["NLL per frame"][-1]
    assert "| fewer-frames |" in (out / "results.md").read_text()
