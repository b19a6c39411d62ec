"""`localopt-bench quality` end to end on a tiny budget: every run trains to the same analytic FLOP
budget, is evaluated (NLL per frame, generated videos classified, flow error) and lands in the
tables and the plot (the figures themselves are recorded in docs/RESULTS.md, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.launch import REPO, subprocess_env

pytestmark = pytest.mark.slow


def test_quality_bench_spends_equal_flops(tmp_path):
    shards = tmp_path / "shards"
    for split, videos, seed in (("train", 16, 0), ("valid", 8, 900)):
        subprocess.run([sys.executable, "-m", "localopt_plugin.commands.preprocess",
                        f"procedural-calm:{videos}:{seed}", "--output", str(shards / split),
                        "--videos-per-shard", "8", "--no-progress"],
                       check=True, cwd=REPO, env=subprocess_env(), capture_output=True)
    out = tmp_path / "quality"
    command = [sys.executable, "-m", "localopt_plugin.commands.bench", "quality", "--preset",
               "cpu", "--full-steps", "3", "--seeds", "7", "--generate-per-class", "1",
               "--data-path", str(shards / "train/train-{000000..000001}.tar"),
               "--valid-data-path", str(shards / "valid/train-000000.tar"), "--background",
               "calm", "--out", str(out), "--variants", "fewer-frames", "+ balanced + ReCo"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads((out / "results.json").read_text())
    runs = {r["variant"]: r for r in result["runs"]}
    assert set(runs) == {"full-sequence", "fewer-frames", "+ balanced + ReCo"}
    full = runs["full-sequence"]
    assert full["steps"] == 3
    for name in ("fewer-frames", "+ balanced + ReCo"):
        # cheaper steps: more of them, never more compute than full-sequence's budget
        assert runs[name]["steps"] > full["steps"]
        assert runs[name]["compute (PFLOP)"] <= full["compute (PFLOP)"] * (1 + 1e-9)
    fewer = runs["fewer-frames"]  # constant cost per step: the budget is nearly used up
    per_step = fewer["compute (PFLOP)"] / fewer["steps"]
    assert full["compute (PFLOP)"] - fewer["compute (PFLOP)"] < per_step
    for row in result["runs"]:
        assert len(row["NLL per frame"]) == 5 and row["flow warp error"] > 0
        assert 0 <= row["accuracy"] <= 1 and row["frechet distance"] > 0
        assert row["valid loss vs compute"]
        assert row["valid loss vs compute"][-1][0] <= row["compute (PFLOP)"] * 1e15 * (1 + 1e-9)
    table = (out / "results.md").read_text()
    assert "| fewer-frames |" in table and "compute (PFLOP)" in table
    assert (out / "nll_vs_compute.png").stat().st_size > 0
    # resumed: finished runs are reused; a run scored by other classifier weights is re-scored
    row_file = out / "seed7/balanced---ReCo/row.json"
    row = json.loads(row_file.read_text())
    row_file.write_text(json.dumps({**row, "classifier": "stale", "accuracy": -1.0}))
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                           env=subprocess_env())
    assert again.returncode == 0, again.stderr[-5000:]
    assert again.stdout.count("reusing") == 3 and "steps within" not in again.stdout
    assert again.stdout.count("scoring its samples again") == 1
    rescored = json.loads(row_file.read_text())
    assert rescored["classifier"] == row["classifier"] and rescored["accuracy"] == row["accuracy"]
    bad = subprocess.run(
        [sys.executable, "-m", "localopt_plugin.commands.bench", "quality", "--out",
         str(tmp_path / "bad"), "--variants", "local-opt + typo"],
        cwd=REPO, capture_output=True, text=True, env=subprocess_env())
    assert bad.returncode != 0 and "unknown --variants" in bad.stderr
