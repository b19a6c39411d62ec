"""Shared fixtures: a world-of-one process group for in-process tests, and launch helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# init_distributed sets these in the pytest process (dist_world_of_one); a child trainer that
# inherits them believes it was launched and binds the MASTER_PORT this process holds.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT")


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ for a child trainer: no rendezvous variables, CPU defaults, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="session")
def dist_world_of_one():
    """torch.distributed (gloo) and Megatron parallel state for a single process."""
    from localopt_plugin.training.distributed import init_distributed

    init_distributed(seed=1234)
    yield


# A tiny synthetic-data training run shared by the multi-process tests (6 iterations, 2 layers).
TINY_TRAIN_FLAGS = (
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--hidden-dropout", "0", "--attention-dropout", "0",
    "--synthetic-frames", "3", "--synthetic-frame-tokens", "16",
    "--synthetic-codebook-size", "64", "--synthetic-num-classes", "4",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6",
    "--lr", "1e-3", "--lr-warmup-iters", "2", "--log-interval", "1",
)


def tiny_args(*extra: str):
    """Parsed trainer flags for a small, dropout-free model."""
    from localopt_plugin.arguments import build_parser

    args = build_parser().parse_args([
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--synthetic-frames", "4", "--synthetic-frame-tokens", "16",
        "--synthetic-codebook-size", "64", "--synthetic-num-classes", "4",
        *extra,
    ])
    args.max_position_embeddings = args.max_position_embeddings or 256
    return args


def run_train(tmp_path: Path, *flags: str, nproc: int = 1, name: str = "run",
              timeout: int = 600) -> list[dict]:
    """Run localopt-train (under torchrun when nproc > 1); return its per-iteration metrics."""
    metrics = tmp_path / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "localopt_plugin.train", "--metrics-file", str(metrics), *flags]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "localopt_plugin.train",
               "--metrics-file", str(metrics), *flags]
    env = subprocess_env()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return [json.loads(line) for line in metrics.read_text().splitlines()]
