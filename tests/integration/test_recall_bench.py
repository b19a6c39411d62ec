"""`localopt-bench recall` end to end on its `ci` preset (a few steps, no claim asserted): real
shards of the recall variant, the real trainer, one evaluator process per run; every row is its
own run's evaluation, results.md is the JSON's tables, a rerun reuses finished runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.launch import REPO, subprocess_env

pytestmark = pytest.mark.slow


def _rows_are_their_runs_evaluations(out, result):
    from localopt_plugin.bench.recall import VARIANTS, format_table, row_metrics

    for row in result["runs"]:
        variant = next(v for v in VARIANTS if v.name == row["variant"])
        run_dir = out / f"seed{row['seed']}" / variant.slug
        evaluation = json.loads((run_dir / "recall.json").read_text())
        assert evaluation["checkpoint"] == row["checkpoint"] == str(run_dir / "checkpoint")
        for key, value in row_metrics(evaluation).items():
            assert row[key] == value, key
        # the figures behind the row: recall accuracy is the share of clips that hid the object
        # and show it afterwards in the true cue's colour (the prompts' true colours)
        prompted = evaluation["prompted"]
        kept = [a == c for a, c in zip(prompted["colours after hiding"],
                                       prompted["cue colours"], strict=True)]
        hid = prompted["hid per clip"]
        assert row["prompted colour kept after hiding"] == pytest.approx(sum(kept) / len(kept))
        assert row["prompted hid the object"] == pytest.approx(sum(hid) / len(hid))
        assert row["prompted recall accuracy"] == pytest.approx(
            sum(k and h for k, h in zip(kept, hid, strict=True)) / len(kept))
        worth = evaluation["cue worth per clip"]
        assert row["cue worth (nats per clip)"] == pytest.approx(sum(worth) / len(worth))
        if variant.objective == "fewer-frames":
            chunked = json.loads((run_dir / "recall-chunked.json").read_text())
            assert chunked["sampling"]["mode"] == "chunked"
            assert chunked["sampling"]["chunk_frames"] + chunked["sampling"][
                "context_frames"] == result["settings"]["window"]  # within its trained length
            assert row["prompted recall accuracy (within trained length)"] == \
                chunked["prompted"]["recall accuracy"]
    assert format_table(result) in (out / "results.md").read_text()


def test_recall_bench_machinery(tmp_path):
    out = tmp_path / "recall"
    command = [sys.executable, "-m", "localopt_plugin.commands.bench", "recall", "--preset",
               "ci", "--seeds", "3", "--out", str(out), "--variants", "fewer-frames 0.5x"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads((out / "results.json").read_text())
    runs = {r["variant"]: r for r in result["runs"]}
    assert set(runs) == {"full-sequence", "fewer-frames 0.5x"}
    assert runs["full-sequence"]["steps"] == 6
    assert runs["fewer-frames 0.5x"]["compute (PFLOP)"] <= \
        0.5 * runs["full-sequence"]["compute (PFLOP)"] * (1 + 1e-9)
    # the data seed follows the run seed; the held-out clips are the reference split's
    manifest = json.loads((out / "seed3/data/train/manifest.json").read_text())
    assert manifest["tokenizer"]["name"] == "fsq-video-recall"
    assert manifest["latent_grid"] == [17, 8, 8]
    evaluation = json.loads((out / "seed3/full-sequence/recall.json").read_text())
    assert evaluation["setting"].startswith("split=reference")
    real = evaluation["real clips through the tokenizer"]
    assert real["recall accuracy"] == 1.0  # the yardstick holds on real clips ...
    assert evaluation["colour-swapped control"]["recall accuracy"] == 0.0  # ... and can fail
    _rows_are_their_runs_evaluations(out, result)
    swapped = json.loads(json.dumps(result))  # negative control: two runs' figures swapped
    first, last = swapped["runs"]
    first["cue worth (nats per clip)"], last["cue worth (nats per clip)"] = (
        last["cue worth (nats per clip)"], first["cue worth (nats per clip)"])
    with pytest.raises(AssertionError):
        _rows_are_their_runs_evaluations(out, swapped)
    assert "pilot gate" in (out / "results.md").read_text()
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                           env=subprocess_env())
    assert again.returncode == 0, again.stderr[-5000:]
    assert again.stdout.count("reusing") == 2 and "steps (" not in again.stdout
    bad = subprocess.run([sys.executable, "-m", "localopt_plugin.commands.bench", "recall",
                          "--out", str(tmp_path / "bad"), "--recall", "colours=12"],
                         cwd=REPO, capture_output=True, text=True, env=subprocess_env())
    assert bad.returncode != 0 and "colours must lie" in bad.stderr
    for flags, message in ((["--recall", "hide=17+60"], "leaves no latent frame"),
                           (["--add-variant", "x", "0.5", "--objective local-opt --bogus 3"],
                            "not localopt-train flags: --bogus 3")):
        refused = subprocess.run([sys.executable, "-m", "localopt_plugin.commands.bench",
                                  "recall", "--out", str(tmp_path / "bad"), *flags],
                                 cwd=REPO, capture_output=True, text=True, env=subprocess_env())
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr[-2000:]
