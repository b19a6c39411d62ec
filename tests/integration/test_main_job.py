"""A tiny version of the README's main command, end to end, checking every artefact."""

from __future__ import annotations

import json
import subprocess
import sys

import av
import pytest
from helpers.launch import REPO, subprocess_env
from PIL import Image

pytestmark = pytest.mark.slow


def test_main_job_end_to_end(tmp_path, dist_world_of_one):
    out = tmp_path / "main"
    proc = subprocess.run(
        ["bash", str(REPO / "launch/main_job.sh"),
         "--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "2",
         "--num-query-groups", "1", "--ffn-hidden-size", "128", "--eval-interval", "4",
         "--save-interval", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
        env=subprocess_env(PYTHON=sys.executable, OUT=str(out), VIDEOS="32", VALID_VIDEOS="16",
                           VIDEOS_PER_SHARD="16", TRAIN_ITERS="6", GEN_LABELS="0 5",
                           GEN_PER_CLASS="1", TEMPERATURE="0.7", TOP_K="5", SEED="5"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for step in range(1, 6):
        assert f"=== [{step}/5]" in proc.stdout

    # shards read back through the loader, with the manifest's layout
    from localopt_plugin.data.wds import VideoWdsConfig, video_wds

    source = video_wds(VideoWdsConfig(
        data_path=(str(out / "shards/train/train-{000000..000001}.tar"),), num_workers=0))
    batch = next(source.train.batches(2, 0, 1, seed=0))
    assert batch["tokens"].shape == (2, source.layout.seq_length)
    assert source.layout.num_frames == 5 and source.layout.frame_tokens == 256
    # the simple variant's tokenizer: fsq-video's ids cut to the simple clips' codebook
    from localopt_plugin.tokenizers import build_tokenizer

    manifest = source.info["manifest"]
    assert manifest.tokenizer == "fsq-video-simple"
    assert source.vocab.video_vocab_size == build_tokenizer("fsq-video-simple").vocab_size < 200

    # the checkpoint loads into a plain GPTModel
    from localopt_plugin.training.convert import load_trained_model

    model, meta = load_trained_model(str(out / "checkpoints"))
    assert meta["iteration"] == 6 and meta["config"]["objective"] == "local-opt"
    assert meta["config"]["run"]["seed"] == 5  # SEED reaches the trainer
    import torch

    tag = (out / "checkpoints" / "latest").read_text().strip()
    held = torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt",
                      weights_only=False)["module"]
    assert sum(p.numel() for p in model.parameters()) == sum(
        v.numel() for k, v in held.items() if torch.is_tensor(v) and "_extra_state" not in k)
    # ReCo ran, in the job's form (pre-norm states, sum over the hidden size, weight 0.1)
    (name, reco), = meta["config"]["regularizers"]
    assert name == "reco" and (reco["states"], reco["reduction"], reco["weight"]) == (
        "pre-norm", "sum", 0.1)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["reco loss"] > 0 for r in records)

    # generated videos decode: GIF with Pillow, mp4 with PyAV
    for label in (0, 5):
        gif = Image.open(out / f"samples/class{label:02d}_00.gif")
        assert gif.n_frames == 17 and gif.size == (64, 64)
        with av.open(str(out / f"samples/class{label:02d}_00.mp4")) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 17 and frames[0].shape == (64, 64, 3)
    assert Image.open(out / "samples/grid.png").size[0] > 64
    settings = json.loads((out / "samples/samples.json").read_text())["settings"]
    assert (settings["temperature"], settings["top_k"]) == (0.7, 5)  # the job's sampling env

    # evaluation outputs and the report
    nll = json.loads((out / "eval/nll.json").read_text())
    assert len(nll["per_frame_nll"]) == 5
    assert len(nll["null_condition"]["per_frame_nll"]) == 5  # the condition check ran
    flow = json.loads((out / "eval/flow.json").read_text())
    assert flow["num_videos"] == 2
    classes = json.loads((out / "eval/classes.json").read_text())
    assert classes["num videos"] == 2 and classes["background"] == "simple"
    assert classes["accuracy"] in (0.0, 0.5, 1.0)  # a share of 2 videos
    report = (out / "report.md").read_text()
    # the report's figures are the JSON files'
    table = dict(line.strip("|").split("|")[:2] for line in report.splitlines()
                 if line.startswith("| ") and line.count("|") == 3)
    table = {k.strip(): v.strip() for k, v in table.items()}
    for key in ("accuracy", "frechet distance", "num videos"):
        assert float(table[key]) == pytest.approx(classes[key], rel=1e-3), key
    nll_row = next(line for line in report.splitlines() if line.startswith("| NLL | "))
    assert [float(v) for v in nll_row.strip("|").split("|")[1:]] == pytest.approx(
        nll["per_frame_nll"], abs=1e-3)
    assert f"mean {flow['mean']:.4f} over 2" in report
    for section in ("## Training", "## Validation NLL per latent frame",
                    "## Generated videos", "## Classes of the generated videos",
                    "## Temporal consistency"):
        assert section in report
    assert "missing:" not in report and "| NLL, null condition |" in report
    # which evaluation clips are training clips, counted again from pixels (the report counts
    # tokens and classes): the simple variant has 4 clips per class, so most of them are
    import hashlib

    from localopt_plugin.data.procedural import render_video
    from localopt_plugin.evaluation.classifier import REFERENCE_SEED_START

    def digest(i, first_seed):
        return hashlib.sha256(render_video(i % 12, first_seed + i, 17, 64,
                                           background="simple").tobytes()).hexdigest()

    training = {digest(i, 0) for i in range(32)}
    valid = sum(digest(i, 500000) in training for i in range(16))
    reference = sum(digest(i, REFERENCE_SEED_START) in training
                    for i in range(classes["num real reference clips"]))
    assert 0 < valid and 0 < reference  # the case the label exists for
    assert f"validation clips: {valid} of the 16 are training clips" in report
    assert (f"{reference} of the {classes['num real reference clips']} are training clips"
            in report)
    assert Image.open(out / "loss_curves.png").format == "PNG"
    assert Image.open(out / "real_vs_generated.png").format == "PNG"


def test_main_job_refuses_an_unknown_variant(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "launch/main_job.sh")], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env=subprocess_env(OUT=str(tmp_path / "main"), VARIANT="noisy"))
    assert proc.returncode == 2 and "use plain, simple, calm or textured" in proc.stderr
    assert "=== [1/5]" not in proc.stdout


@pytest.mark.parametrize("setting", [{"TEMPERATURE": "-1"}, {"CFG_SCALE": "nan"},
                                     {"CFG_SCALE": "-2"}], ids=["temperature", "cfg-nan",
                                                                "cfg-negative"])
def test_main_job_refuses_bad_sampling_settings_before_any_work(tmp_path, setting):
    proc = subprocess.run(["bash", str(REPO / "launch/main_job.sh")], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=subprocess_env(PYTHON=sys.executable, OUT=str(tmp_path / "main"),
                                             **setting))
    (name, value), = setting.items()
    assert proc.returncode == 2 and f"{name}={value}" in proc.stderr
    assert "need temperature >= 0" in proc.stderr and "=== [1/5]" not in proc.stdout


def test_main_job_seeds_keeps_finished_runs_and_writes_the_spread(tmp_path):
    """launch/main_job_seeds.sh: a seed whose report exists is not run again; the figures of
    every seed's run go to one table (the run here: finished runs' evaluation files)."""
    import json

    for seed, accuracy in ((1, 0.5), (2, 1.0)):
        run = tmp_path / f"main-seed{seed}"
        (run / "eval").mkdir(parents=True)
        (run / "report.md").write_text("done")
        (run / "eval" / "classes.json").write_text(json.dumps({
            "accuracy": accuracy, "first frames accuracy": 1.0, "last frames accuracy": 0.5,
            "frechet distance": 300.0}))
        (run / "eval" / "nll.json").write_text(json.dumps({"mean_nll": 0.02}))
        (run / "eval" / "flow.json").write_text(json.dumps({"mean": 0.01}))
    proc = subprocess.run(["bash", str(REPO / "launch/main_job_seeds.sh")], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=subprocess_env(PYTHON=sys.executable, SEEDS="1 2",
                                             BASE=str(tmp_path / "main-seed"),
                                             SPREAD=str(tmp_path / "spread.md")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("exists, kept") == 2
    text = (tmp_path / "spread.md").read_text()
    assert "| **mean** | 0.75 |" in text
