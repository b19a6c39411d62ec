"""Megatron-LM's own ``pretrain()`` with the plugin, for real, on CPU over gloo: the example
script trains Local Opt. + ReCo on the embedded data (procedural videos -> fsq-video tokens ->
shards) for 20 iterations and gives the losses localopt-train gives with the same flags and data;
without validation data it trains without error, with it it reports the full-sequence loss.

It runs in the Python 3.12 environment of ``tools/setup_megatron_lm_env.sh`` (``megatron.training``
needs it); CI creates that environment and sets ``LOCALOPT_REQUIRE_MEGATRON_LM=1``, so there a
missing environment fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import launch
from helpers.launch import REPO, TRAIN_MODULE, subprocess_env

from localopt_plugin.model.presets import megatron_flags

pytestmark = pytest.mark.slow

ITERS = 20
# the same run for both trainers: the test preset, the embedded data, Local Opt. + ReCo
COMMON = (
    *megatron_flags("test"),
    "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(ITERS),
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
    "--weight-decay", "0.01", "--seed", "1234",
    # Megatron's gradient clipping asserts CUDA tensors (see docs/megatron-lm.md): off in both
    "--clip-grad", "0",
    "--objective", "local-opt", "--regularizer", "reco", "--reco-reduction", "mean",
    "--dataset", "video-wds", "--data-num-workers", "0",
)
# what Megatron-LM needs besides: gloo, no CUDA-only fused kernels, a (unused) tokenizer,
# the plugin's streams, the local layer spec
MEGATRON_ONLY = (
    "--distributed-backend", "gloo", "--no-persist-layer-norm", "--no-masked-softmax-fusion",
    "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
    "--no-gradient-accumulation-fusion", "--no-rope-fusion", "--tokenizer-type",
    "NullTokenizer", "--vocab-size", "8", "--dataloader-type", "external",
    "--transformer-impl", "local", "--log-interval", "1",
)
NUMBER = r"([-+0-9.]+E[-+][0-9]+)"


@pytest.fixture(scope="module")
def megatron_lm_python():
    return launch.megatron_lm_python()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The embedded data: procedural videos tokenized by fsq-video into shards."""
    out = tmp_path_factory.mktemp("embedded")
    for split, spec in (("train", "procedural:48:0"), ("valid", "procedural:16:500000")):
        subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m",
                        "localopt_plugin.commands.preprocess", spec, "--output",
                        str(out / split), "--videos-per-shard", "16", "--no-progress"],
                       cwd=REPO, env=subprocess_env(), check=True, capture_output=True)
    return {split: str(out / split / f"train-{{000000..{count:06d}}}.tar")
            for split, count in (("train", 2), ("valid", 0))}


def _layout_flags(python: str, pattern: str) -> tuple[str, ...]:
    """--seq-length and --max-position-embeddings of the shards' samples."""
    code = ("import sys; from localopt_plugin.data.wds import VideoWdsConfig, video_wds; "
            "print(video_wds(VideoWdsConfig(data_path=(sys.argv[1],), num_workers=0))"
            ".layout.input_length)")
    length = subprocess.run([python, "-c", code, pattern], cwd=REPO, env=subprocess_env(),
                            check=True, capture_output=True, text=True).stdout.split()[-1]
    return ("--seq-length", length, "--max-position-embeddings", length)


def _torchrun(python: str, nproc: int, *command: str, env=None) -> subprocess.CompletedProcess:
    cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *command]
    # Megatron-LM's launch setting for tensor parallelism (as in its example scripts)
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def _megatron_losses(stdout: str, key: str) -> list[float]:
    """Per-iteration values of Megatron-LM's training log. With --log-interval 1 its first
    logged value is iteration 1's and its second averages iterations 1 and 2 (Megatron does
    not reset its sums after the first iteration); every later one is its own iteration's."""
    values = [float(v) for v in re.findall(rf"\| {key}: {NUMBER} \|", stdout)]
    if len(values) >= 2:
        values[1] = 2 * values[1] - values[0]
    return values


def _run_both(python, shards, tmp_path, nproc, *extra, valid=False, env=None, megatron=(),
              localopt=()):
    """Both trainers with the same flags (plus ``megatron`` / ``localopt`` for one of them)."""
    flags = (*COMMON, *_layout_flags(python, shards["train"]), *extra)
    # with validation data Megatron-LM wants its splits named: --train-data-path
    train = "--train-data-path" if valid else "--data-path"
    valid_data = ("--valid-data-path", shards["valid"]) if valid else ()
    megatron = _torchrun(python, nproc, str(REPO / "examples" / "pretrain_video_gpt.py"),
                         *flags, *megatron, train, shards["train"], *valid_data,
                         *MEGATRON_ONLY, env=env)
    metrics = tmp_path / f"localopt-{nproc}.jsonl"
    _torchrun(python, nproc, "-m", TRAIN_MODULE, *flags, *localopt, "--data-path",
              shards["train"], *valid_data, "--metrics-file", str(metrics), "--log-interval", "1")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return megatron.stdout + megatron.stderr, records


@pytest.mark.parametrize("layout", [(), ("--tensor-model-parallel-size", "2")],
                         ids=["dp2", "tp2"])
def test_pretrain_gives_localopt_train_losses(megatron_lm_python, shards, tmp_path, layout):
    extra = (*layout, "--eval-interval", "1000", "--eval-iters", "1")
    log, records = _run_both(megatron_lm_python, shards, tmp_path, 2, *extra)
    assert "no validation split" in log and "turned off" in log  # no data: no evaluation
    for key in ("lm loss", "reco loss"):
        got = _megatron_losses(log, key)
        assert len(got) == ITERS, log[-3000:]
        assert got == pytest.approx([r[key] for r in records], rel=1e-4), key
    assert len({r["window start"] for r in records}) > 1  # windows with context were trained


def test_pretrain_validation_reports_the_full_sequence_loss(megatron_lm_python, shards,
                                                            tmp_path):
    """Megatron-LM's first evaluation (iteration 10) reports localopt-train's full-sequence
    validation loss on the same samples: one Megatron eval iteration is 2 micro-batches per rank
    here, so localopt-train evaluates 2 micro-batches. (Later evaluations differ by design:
    Megatron-LM reads on in its validation stream, localopt-train re-reads its first samples.)"""
    log, records = _run_both(megatron_lm_python, shards, tmp_path, 2, "--eval-interval", "10",
                             valid=True, megatron=("--eval-iters", "1"),
                             localopt=("--eval-iters", "2"))
    got = [float(v) for v in re.findall(
        rf"validation loss at iteration 10 \| valid full-sequence loss value: {NUMBER}", log)]
    want = [r["valid full-sequence loss"] for r in records if r["iteration"] == 10]
    assert len(got) == len(want) == 1, log[-3000:]
    assert got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("version", ["0.17.1", "0.18.2"])
def test_pretrain_on_earlier_megatron_lm_versions(megatron_lm_python, shards, tmp_path,
                                                  version):
    """The same pretrain() call on megatron-core 0.17 and 0.18 (put first on PYTHONPATH) gives
    localopt-train's losses on that version, as 0.19 does."""
    target = Path(megatron_lm_python).parents[1] / f"megatron-core-{version}"
    if not (target / "megatron").is_dir():
        pytest.fail(f"{target} missing: run tools/setup_megatron_lm_env.sh")
    env = {"PYTHONPATH": os.pathsep.join([str(target), str(REPO / "tests")])}
    extra = ("--eval-interval", "1000", "--eval-iters", "1", "--train-iters", "6")
    log, records = _run_both(megatron_lm_python, shards, tmp_path, 2, *extra, env=env)
    assert f"megatron-core {version}" in log
    for key in ("lm loss", "reco loss"):
        got = _megatron_losses(log, key)
        assert len(got) == 6, log[-3000:]
        assert got == pytest.approx([r[key] for r in records], rel=1e-4), key
