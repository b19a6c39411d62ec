"""Checkpoints: kill -9 a 2-rank run, resume, and match the uninterrupted run exactly;
DeepSpeed's zero_to_fp32 output loads into a plain Megatron-Core GPTModel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers.configs import PRESET_TRAIN_FLAGS
from helpers.launch import REPO, TRAIN_MODULE, run_train, subprocess_env

pytestmark = pytest.mark.slow

FLAGS = (
    "--num-layers", "2", "--hidden-size", "96", "--num-attention-heads", "4",
    "--hidden-dropout", "0.1", "--attention-dropout", "0.1",  # RNG state must be restored too
    "--synthetic-frames", "4", "--synthetic-frame-tokens", "32",
    "--synthetic-codebook-size", "64", "--synthetic-num-classes", "4",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "30",
    "--lr", "1e-3", "--lr-warmup-iters", "3", "--log-interval", "1",
    "--objective", "local-opt", "--zero-stage", "1",
)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _torchrun(*flags):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", TRAIN_MODULE, *flags]


def test_kill_dash_nine_then_resume_matches_uninterrupted_run(tmp_path):
    reference = run_train(tmp_path, *FLAGS, nproc=2, name="reference")
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "killed.jsonl"
    paused = tmp_path / "paused"
    # the job stops after iteration 12 (checkpoint 10 saved) and waits there to be killed
    env = subprocess_env(LOCALOPT_PAUSE_AT=f"train-iteration:12:{paused}")
    proc = subprocess.Popen(
        _torchrun(*FLAGS, "--save", str(ckpt), "--save-interval", "5",
                  "--metrics-file", str(metrics)),
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    deadline = time.time() + 300
    while not paused.exists():  # waiting on the job's own signal: no race with its progress
        assert proc.poll() is None, "the run ended before its pause point"
        assert time.time() < deadline, "the run never reached its pause point"
        time.sleep(0.05)
    # SIGKILL torchrun and every rank it started (ranks run in sessions of their own)
    victims = _descendants(proc.pid) + [proc.pid]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    for pid in victims:  # SIGKILL is delivered; wait until the kernel has reaped them
        while os.path.exists(f"/proc/{pid}/cmdline") and _alive(pid):
            assert time.time() < deadline
            time.sleep(0.05)
    assert len(metrics.read_text().splitlines()) == 12  # stopped where it paused
    saved = int((ckpt / "latest").read_text().split("_")[-1])
    assert saved == 10

    resumed = run_train(tmp_path, *FLAGS, "--load", str(ckpt), nproc=2, name="resumed")
    assert [r["iteration"] for r in resumed] == list(range(saved + 1, 31))
    for got in resumed:
        want = reference[got["iteration"] - 1]
        # bitwise: same data, window draws, RNG streams and optimizer state on CPU
        assert got["lm loss"] == want["lm loss"], (got, want)
        assert got["lr"] == want["lr"]


def test_zero_to_fp32_checkpoint_loads_into_plain_gptmodel(tmp_path):
    """On the shipped presets' architecture (RoPE, RMSNorm, SwiGLU, GQA, no bias, untied)."""
    model = FLAGS.index("--hidden-dropout")  # FLAGS' own model shape -> preset "test"
    flags = ("--preset", "test", *FLAGS[model:-2], "--zero-stage", "2", "--train-iters", "3",
             "--hidden-dropout", "0", "--attention-dropout", "0")
    ckpt = tmp_path / "ckpt"
    run_train(tmp_path, *flags, "--save", str(ckpt), nproc=2, name="zero2")
    script = ckpt / "zero_to_fp32.py"
    assert script.exists()
    out = tmp_path / "fp32"
    convert = subprocess.run([sys.executable, str(script), str(ckpt), str(out)], cwd=REPO,
                             capture_output=True, text=True, env=subprocess_env())
    assert convert.returncode == 0, convert.stderr[-3000:]
    check = subprocess.run(
        [sys.executable, str(REPO / "tests" / "helpers" / "load_fp32_into_gptmodel.py"), str(out),
         str(ckpt), json.dumps(flags)],
        cwd=REPO, capture_output=True, text=True, env=subprocess_env())
    assert check.returncode == 0, check.stderr[-4000:]
    assert "logits match" in check.stdout and "rebuilt from checkpoint" in check.stdout
    assert "swapped layers fail" in check.stdout  # the comparison's negative control


def test_resume_flags_leave_out_what_they_name(tmp_path):
    """Megatron's resume flags, each against the uninterrupted run U (6 iterations, resumed
    from its checkpoint of iteration 4). A step's loss is computed before its update,
    so it depends on the weights, the batch and the dropout masks only:

    * ``--no-load-optim``: iteration 5 goes on from the checkpoint (U's loss), the LR schedule
      restarts (U's LR of iteration 1), and fresh Adam moments make iteration 6 differ from U;
    * ``--no-load-lr-state --no-load-rng``: the LR restarts while the iteration goes on, and
      iteration 5's loss differs from U's (other dropout masks, same weights and batch);
    * ``--reset-iteration``: iterations count from 1 on the data's first batch, with the saved
      LR schedule (U's LR of iteration 5);
    * ``--finetune``: iterations from 1 on the first batch with U's LR of iteration 1 and U's
      dropout masks: only the loaded weights make iteration 1's loss differ from U's.

    Without these flags a resumed run matches U exactly (the test above): the control."""
    flags = (*PRESET_TRAIN_FLAGS, "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
             "--lr-decay-iters", "6", "--lr-decay-style", "linear")
    ckpt = tmp_path / "ckpt"
    full = {r["iteration"]: r for r in run_train(tmp_path, *flags, "--save", str(ckpt),
                                                 "--save-interval", "4", name="full")}
    (ckpt / "latest").write_text("iter_0000004")  # resume from iteration 4, not the last

    def resumed(name: str, *extra: str) -> dict[int, dict]:
        records = run_train(tmp_path, *flags, "--load", str(ckpt), *extra, name=name)
        return {r["iteration"]: r for r in records}

    optim = resumed("no-load-optim", "--no-load-optim")
    assert sorted(optim) == [5, 6]
    assert optim[5]["lm loss"] == full[5]["lm loss"] and optim[5]["lr"] == full[1]["lr"]
    assert optim[6]["lm loss"] != full[6]["lm loss"]

    lr_rng = resumed("no-load-lr-state", "--no-load-lr-state", "--no-load-rng")
    assert sorted(lr_rng) == [5, 6] and lr_rng[5]["lr"] == full[1]["lr"]
    assert lr_rng[5]["lm loss"] != full[5]["lm loss"]

    reset = resumed("reset-iteration", "--reset-iteration", "--train-iters", "2")
    assert sorted(reset) == [1, 2] and reset[1]["lr"] == full[5]["lr"]
    assert reset[1]["lm loss"] != full[1]["lm loss"]

    finetune = resumed("finetune", "--finetune", "--train-iters", "2")
    assert sorted(finetune) == [1, 2] and finetune[1]["lr"] == full[1]["lr"]
    assert finetune[1]["lm loss"] < full[1]["lm loss"] - 0.01  # the trained weights


def test_pipeline_checkpoint_of_the_layout_before_gptmodel_stages_resumes(tmp_path):
    """A PP=2 checkpoint in the layout written before each stage became one GPTModel
    (tests/data/README.md: weights by whole-model names, ZeRO-1 optimizer state as saved)
    resumes to the uninterrupted run's iterations 3-4."""
    import shutil

    fixture = REPO / "tests" / "data" / "pipeline_checkpoint_v1"
    load = tmp_path / "ckpt"
    shutil.copytree(fixture, load, ignore=shutil.ignore_patterns("*.pt.expected", "*.jsonl"))
    flags = ("--preset", "test", "--num-layers", "2", "--hidden-size", "32",
             "--ffn-hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
             "--synthetic-frames", "3", "--synthetic-frame-tokens", "8",
             "--synthetic-codebook-size", "32", "--synthetic-num-classes", "4",
             "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
             "--lr", "1e-3", "--log-interval", "1", "--objective", "local-opt",
             "--regularizer", "reco", "--pipeline-model-parallel-size", "2", "--zero-stage", "1",
             "--make-vocab-size-divisible-by", "8", "--load", str(load))
    resumed = run_train(tmp_path, *flags, nproc=2, name="resumed")
    expected = [json.loads(line) for line in
                (fixture / "continued_metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in resumed] == [3, 4]
    for key in ("lm loss", "reco loss", "grad norm", "window start"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in expected],
                                                          rel=1e-5), key
