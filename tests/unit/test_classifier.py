"""The shipped evaluator of the embedded data: its accuracy on held-out real clips of every variant
the project renders, and the sanity of its Frechet distance (real ~ 0; frame-shuffled and
wrong-class or collapsed sets clearly worse). The reference is the renderer itself: clips whose
class is known by construction, with seeds no training split uses."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers.launch import REPO, subprocess_env

from localopt_plugin.data.procedural import BACKGROUNDS, MOTIONS, NUM_CLASSES, render_video
from localopt_plugin.evaluation import class_report, classify_videos
from localopt_plugin.evaluation.classifier import (
    CONTROL_SEED_START,
    HELDOUT_SEED_START,
    REFERENCE_SEED_START,
    feature_distance,
    procedural_clips,
    segment_report,
    video_features,
)
from localopt_plugin.evaluation.segments import segments
from localopt_plugin.video.io import write_mp4


@pytest.fixture(scope="module")
def reference_features():
    clips, _ = procedural_clips(192, REFERENCE_SEED_START, background="calm")
    return video_features(clips)


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_held_out_accuracy(background):
    """The issue's bar, 98%, on every variant the project renders."""
    clips, labels = procedural_clips(240, HELDOUT_SEED_START, background=background)
    assert (classify_videos(clips) == labels).mean() >= 0.98


def test_recognises_clips_decoded_by_the_embedded_tokenizer():
    from localopt_plugin.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("fsq-video")
    clips, labels = procedural_clips(48, HELDOUT_SEED_START + 5000, background="calm")
    decoded = np.stack([tokenizer.decode(tokenizer.encode(c)) for c in clips])
    assert (classify_videos(decoded) == labels).mean() >= 0.9


def test_frechet_distance_real_near_zero_shuffled_and_wrong_class_clearly_worse(
        reference_features):
    clips, labels = procedural_clips(96, CONTROL_SEED_START, background="calm")
    real = feature_distance(video_features(clips), reference_features)
    rng = np.random.default_rng(0)
    shuffled = np.stack([c[rng.permutation(len(c))] for c in clips])
    one_class = np.stack([render_video(0, CONTROL_SEED_START + i, 17, background="calm")
                          for i in range(96)])
    worse = {"frame-shuffled": feature_distance(video_features(shuffled), reference_features),
             "one class only": feature_distance(video_features(one_class), reference_features)}
    assert all(value > 5 * real for value in worse.values()), (real, worse)
    # wrong-class labels: the class report sees the mismatch
    report = class_report(clips, (labels + 1) % NUM_CLASSES, background="calm", real_count=96)
    assert report["accuracy"] <= 0.05
    assert report["real clips accuracy"] >= 0.95
    # 96 against 96 clips: the small-count bias is larger than above's 96 against 192
    assert report["frechet distance of real clips"] < min(worse.values()) / 3


def test_accuracy_parts_and_shape_motion_split():
    clips, labels = procedural_clips(24, HELDOUT_SEED_START + 7000, background="calm")
    wrong_motion = labels - labels % len(MOTIONS) + (labels + 1) % len(MOTIONS)
    report = class_report(clips, wrong_motion, background="calm", real_count=24)
    assert report["shape accuracy"] >= 0.95 and report["motion accuracy"] <= 0.1
    assert {"first frames accuracy", "last frames accuracy"} <= set(report)



@pytest.mark.parametrize("background", BACKGROUNDS)
def test_every_segment_of_real_long_clips_is_recognised(background):
    """65-frame clips (17 latent frames): each 17-frame segment, the first to the last, is
    read at the issue's bar (the motions are periodic, so the class holds all along)."""
    clips, labels = procedural_clips(60, HELDOUT_SEED_START, num_frames=65,
                                     background=background)
    assert segments(65) == [(0, 17), (16, 33), (32, 49), (48, 65)]
    for start, end in segments(65):
        assert (classify_videos(clips[:, start:end]) == labels).mean() >= 0.98, (start, end)


def test_long_videos_are_reported_per_segment():
    """Real 65-frame clips scored as generated ones: every segment recognised and as close to
    the real clips as the real floor; with the motion labels wrong, every segment says so."""
    clips, labels = procedural_clips(12, HELDOUT_SEED_START + 9000, num_frames=65,
                                     background="calm")
    report = class_report(clips, labels, background="calm", real_count=12)
    assert [s["frames"] for s in report["segments"]] == [[0, 17], [16, 33], [32, 49], [48, 65]]
    for segment in report["segments"]:
        assert segment["accuracy"] == 1.0
        assert segment["frechet distance"] < 3 * segment["frechet distance of real clips"]
    wrong_motion = labels - labels % len(MOTIONS) + (labels + 1) % len(MOTIONS)
    wrong = segment_report(clips, wrong_motion, reference=clips, control=clips)
    assert all(s["motion accuracy"] == 0 and s["shape accuracy"] == 1 for s in wrong)
    assert "segments" not in class_report(clips[:4, :17], labels[:4], background="calm",
                                          real_count=4)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        classify_videos(np.zeros((2, 17, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="at least 5 frames"):
        classify_videos(np.zeros((2, 4, 64, 64, 3), np.uint8))


def test_localopt_eval_classes_reads_mp4s_named_by_class(tmp_path):
    clips, labels = procedural_clips(24, HELDOUT_SEED_START + 9000, background="calm")
    (tmp_path / "videos").mkdir()
    for i, (clip, label) in enumerate(zip(clips, labels, strict=True)):
        write_mp4(tmp_path / "videos" / f"class{label:02d}_{i // NUM_CLASSES:02d}.mp4", clip)
    out = tmp_path / "classes.json"
    proc = subprocess.run([sys.executable, "-m", "localopt_plugin.commands.evaluate", "classes",
                           str(tmp_path / "videos"), "--background", "calm", "--real-count",
                           "48", "--out", str(out)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["num videos"] == 24 and report["accuracy"] >= 0.9
    bad = subprocess.run([sys.executable, "-m", "localopt_plugin.commands.evaluate", "classes",
                          str(tmp_path / "videos"), "--labels", "1", "2"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert bad.returncode != 0 and "2 --labels for 24 videos" in bad.stderr
