"""`localopt-bench quality` end to end on a tiny budget: every run trains to the same analytic FLOP
budget, is evaluated (NLL per frame, generated videos classified, flow error) and lands in the
tables and the plot (the figures themselves are recorded in docs/RESULTS.md, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers.launch import REPO, subprocess_env

pytestmark = pytest.mark.slow


def _run_dir(out, row):
    """Where the bench wrote the row's run: its seed's folder, the variant's own slug."""
    from localopt_plugin.bench.quality import ABLATION

    variant = next(v for v in ABLATION if v.name == row["variant"])
    return out / f"seed{row['seed']}" / variant.slug


def _rows_are_their_runs_evaluations(out, result):
    """Each row's figures are what the evaluators wrote for that run's own checkpoint and
    samples: none taken from another run, none mapped to the wrong key (first/last swapped),
    and results.md is the JSON's table."""
    from localopt_plugin.bench.quality import format_table
    from localopt_plugin.data.procedural import NUM_CLASSES

    per_frame_of_runs = []
    for row in result["runs"]:
        run_dir = _run_dir(out, row)
        nll = json.loads((run_dir / "nll.json").read_text())
        assert nll["checkpoint"] == row["checkpoint"] == str(run_dir / "checkpoint")
        per_frame = nll["per_frame_nll"]
        assert len(per_frame) == 5 and row["NLL per frame"] == per_frame
        assert (row["first-frame NLL"], row["last-frame NLL"]) == (per_frame[0], per_frame[-1])
        assert row["valid NLL"] == pytest.approx(sum(per_frame) / 5, rel=1e-12)
        per_frame_of_runs.append(tuple(per_frame))
        flow = json.loads((run_dir / "flow.json").read_text())
        videos = sorted(flow["videos"])
        assert [p.rsplit("/", 1)[-1] for p in videos] == [
            f"class{c:02d}_00.mp4" for c in range(NUM_CLASSES)]  # one per class, this run's
        assert all(p.startswith(str(run_dir / "samples")) for p in videos)
        means = [flow["videos"][p]["mean"] for p in videos]
        assert row["flow warp error"] == pytest.approx(sum(means) / len(means), rel=1e-12)
        classes = json.loads((run_dir / "classes.json").read_text())
        assert sorted(classes["videos"]) == videos  # the same samples scored
        for key in ("accuracy", "first frames accuracy", "last frames accuracy",
                    "frechet distance", "frechet distance of real clips"):
            assert row[key] == classes[key], key
    assert len(set(per_frame_of_runs)) == len(per_frame_of_runs)  # three models, three curves
    assert format_table(result) in (out / "results.md").read_text()


def _compute_matches_an_independent_count(shards, out, runs):
    """Each run's compute, counted again from the windows its trainer logged: torch's FLOP
    counter on the `tiny` preset model for the matrix products, the explicit mask's pairs for
    attention (not the bench's FLOP model). ReCo's few FLOPs count in neither."""
    from helpers.configs import preset_model
    from helpers.flops_reference import attention_flops, product_flops

    from localopt_plugin.data.wds import VideoWdsConfig
    from localopt_plugin.model import build_gpt_model
    from localopt_plugin.objectives import FewerFrames, FullSequence, LocalOptimization
    from localopt_plugin.plugin import PluginConfig

    source = PluginConfig(dataset="video-wds", dataset_config=VideoWdsConfig(
        data_path=(str(shards / "train/train-{000000..000001}.tar"),), num_workers=0),
        seed=0).build_dataset()
    layout = source.layout
    config = preset_model("tiny", max_position_embeddings=layout.input_length)
    model = build_gpt_model(config, source.vocab.size)
    tokens = torch.zeros(4, layout.seq_length, dtype=torch.long)  # the cpu preset's micro-batch
    cache = {}

    def step_flops(name, start):
        if (name, start) not in cache:
            window = SimpleNamespace(window_frames=2, draw=lambda i, m: int(start))
            objective = {"full-sequence": lambda: FullSequence(layout),
                         "fewer-frames": lambda: FewerFrames(layout, window)}.get(
                name, lambda: LocalOptimization(layout, window))()
            plan = objective.plan(tokens, 0, 0)
            cache[name, start] = product_flops(model, plan) + attention_flops(plan, config)
        return cache[name, start]

    for name, run in runs.items():
        records = [json.loads(line) for line in
                   (_run_dir(out, run) / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if "step time (s)" in r]
        assert len(records) == run["steps"]
        counted = sum(step_flops(name, r.get("window start", r.get("clip start")))
                      for r in records)
        assert run["compute (PFLOP)"] * 1e15 == pytest.approx(counted, rel=1e-6), name


def test_quality_bench_spends_equal_flops(tmp_path, dist_world_of_one):
    shards = tmp_path / "shards"
    for split, videos, seed in (("train", 16, 0), ("valid", 8, 900)):
        subprocess.run([sys.executable, "-m", "localopt_plugin.commands.preprocess",
                        f"procedural-calm:{videos}:{seed}", "--output", str(shards / split),
                        "--videos-per-shard", "8", "--no-progress"],
                       check=True, cwd=REPO, env=subprocess_env(), capture_output=True)
    out = tmp_path / "quality"
    command = [sys.executable, "-m", "localopt_plugin.commands.bench", "quality", "--preset",
               "cpu", "--full-steps", "3", "--seeds", "7", "--generate-per-class", "1",
               "--eval-samples", "8",
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
    _compute_matches_an_independent_count(shards, out, runs)
    fewer = runs["fewer-frames"]  # constant cost per step: the budget is nearly used up
    per_step = fewer["compute (PFLOP)"] / fewer["steps"]
    assert full["compute (PFLOP)"] - fewer["compute (PFLOP)"] < per_step
    _rows_are_their_runs_evaluations(out, result)
    swapped = json.loads(json.dumps(result))  # negative control: two runs' figures swapped
    first, last = swapped["runs"][0], swapped["runs"][-1]
    first["frechet distance"], last["frechet distance"] = (last["frechet distance"],
                                                           first["frechet distance"])
    with pytest.raises(AssertionError, match="frechet distance"):
        _rows_are_their_runs_evaluations(out, swapped)
    for row in result["runs"]:
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
    assert again.stdout.count("reusing") == 3 and "budget:" not in again.stdout
    assert again.stdout.count("scoring its samples again") == 1
    rescored = json.loads(row_file.read_text())
    assert rescored["classifier"] == row["classifier"] and rescored["accuracy"] == row["accuracy"]
    bad = subprocess.run(
        [sys.executable, "-m", "localopt_plugin.commands.bench", "quality", "--out",
         str(tmp_path / "bad"), "--variants", "local-opt + typo"],
        cwd=REPO, capture_output=True, text=True, env=subprocess_env())
    assert bad.returncode != 0 and "unknown --variants" in bad.stderr


def test_long_sweep_budgets_and_per_segment_summary():
    """cpu-long: every variant but full-sequence at a quarter of its FLOPs (the same-steps one at
    its steps); per-segment metrics averaged over seeds segment by segment, drift = last - first."""
    from localopt_plugin.bench.quality import LONG, PRESETS, format_table, summarize

    preset = PRESETS["cpu-long"]
    assert preset.frames == 65 and preset.budget_fraction == 0.25 and preset.sweep == "long"
    assert [v.same_steps for v in LONG] == [False, False, False, False, True]
    rows = []
    for seed, shift in ((1, 0.0), (2, 0.2)):
        for index, variant in enumerate(LONG[:2]):
            rows.append({"variant": variant.name, "seed": seed, "steps": 10, "train time (s)": 1.0,
                         "compute (PFLOP)": 1.0 if index == 0 else 0.25,
                         "NLL per segment": [5 + shift, 5.1 + shift, 5.3 + shift + index],
                         "accuracy per segment": [0.5, 0.25, 0.0 + shift]})
    table = summarize(rows, list(LONG[:2]))
    assert table[1]["NLL per segment"] == pytest.approx([5.1, 5.2, 6.4])
    assert table[1]["NLL drift (last - first segment)"] == pytest.approx(1.3)
    assert table[0]["accuracy per segment"] == pytest.approx([0.5, 0.25, 0.1])
    assert table[1]["compute / full-sequence compute"] == pytest.approx(0.25)
    text = format_table({"sweep": "long", "seeds": [1, 2], "summary": table,
                         "settings": {"budget_fraction": 0.25}})
    assert "0.25x full-sequence's FLOPs" in text and "5.1 5.2 6.4" in text
