"""Clips four times the paper's length through the whole path: 65-frame procedural videos
preprocessed into shards (17 latent frames, 4352 video tokens), Local Opt. + ReCo trained on them
with the shipped architecture, and a 65-frame video generated with full context from the
checkpoint (KV-cached), decoded back from its mp4."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.launch import REPO, run_train, subprocess_env

pytestmark = pytest.mark.slow


def test_long_clips_preprocess_train_and_generate(tmp_path, dist_world_of_one):
    from localopt_plugin.commands.generate import main as generate
    from localopt_plugin.video.io import read_video

    shards = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-m", "localopt_plugin.commands.preprocess",
                           "procedural:2:0", "--frames", "65", "--output", str(shards),
                           "--videos-per-shard", "2"], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["latent_grid"] == [17, 16, 16] and manifest["source"]["frames"] == 65
    checkpoint = tmp_path / "ckpt"
    records = run_train(
        tmp_path, "--preset", "test", "--dataset", "video-wds", "--data-path",
        str(shards / "train-000000.tar"), "--data-num-workers", "0", "--micro-batch-size", "1",
        "--global-batch-size", "1", "--train-iters", "3", "--lr", "1e-3", "--log-interval", "1",
        "--objective", "local-opt", "--local-opt-window-frames", "2", "--regularizer", "reco",
        "--save", str(checkpoint))
    starts = [r["window start"] for r in records if "window start" in r]
    assert len(starts) == 3 and all(0 <= s <= 15 for s in starts)
    out = tmp_path / "samples"
    assert generate(["--checkpoint", str(checkpoint), "--out", str(out), "--class-labels", "1",
                     "--no-progress"]) == 0
    assert read_video(out / "class01_00.mp4").shape == (65, 64, 64, 3)
