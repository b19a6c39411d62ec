"""Running the commands as users do: subprocesses with clean launch variables."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
# init_distributed sets these in the pytest process (dist_world_of_one); a child trainer that
# inherits them believes it was launched and binds the MASTER_PORT this process holds.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT")
TRAIN_MODULE = "localopt_plugin.commands.train"
# what Megatron-LM's pretrain() needs besides the plugin's flags on a CPU: gloo, no CUDA-only
# fused kernels, an (unused) tokenizer, the plugin's streams, the local layer spec
MEGATRON_LM_CPU_FLAGS = (
    "--distributed-backend", "gloo", "--no-persist-layer-norm", "--no-masked-softmax-fusion",
    "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
    "--no-gradient-accumulation-fusion", "--no-rope-fusion", "--tokenizer-type",
    "NullTokenizer", "--vocab-size", "8", "--dataloader-type", "external",
    "--transformer-impl", "local",
)
MEGATRON_LM_PYTHON = Path(os.environ.get("LOCALOPT_MEGATRON_LM_PYTHON",
                                         REPO / ".venv312" / "bin" / "python"))


def megatron_lm_python() -> str:
    """The Python 3.12 environment with Megatron-LM's ``megatron.training``; the calling test
    is skipped without it, or fails where CI requires it (``LOCALOPT_REQUIRE_MEGATRON_LM``
    read as a boolean: 1/true/yes)."""
    import pytest

    if not MEGATRON_LM_PYTHON.exists():
        reason = (f"no Megatron-LM environment at {MEGATRON_LM_PYTHON}: run "
                  f"tools/setup_megatron_lm_env.sh")
        required = os.environ.get("LOCALOPT_REQUIRE_MEGATRON_LM", "").strip().lower()
        if required in ("1", "true", "yes", "on"):
            pytest.fail(reason)
        pytest.skip(reason)
    return str(MEGATRON_LM_PYTHON)


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ for a child process: no rendezvous variables, CPU defaults, the helpers
    importable, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    path = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": path,
            **extra}


def run_train(tmp_path: Path, *flags: str, nproc: int = 1, name: str = "run",
              timeout: int = 600, script: Path | None = None) -> list[dict]:
    """Run localopt-train (under torchrun when nproc > 1), or ``script`` taking its flags;
    return its per-iteration metrics."""
    metrics = tmp_path / "metrics" / f"{name}.jsonl"  # the trainer creates the directory
    entry = [str(script)] if script else ["-m", TRAIN_MODULE]
    cmd = [sys.executable, *entry, "--metrics-file", str(metrics), *flags]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", *entry, "--metrics-file", str(metrics), *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def dry_run(argv: list[str], world: int = 1) -> tuple[int, dict | None, str]:
    """``localopt-train ARGV --dry-run`` as the console script runs it (in this process):
    (exit status, the printed setup, stderr)."""
    from localopt_plugin.commands.train import main

    out, err = io.StringIO(), io.StringIO()
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main([*argv, "--dry-run"])
            except SystemExit as exit_:  # argparse
                status = exit_.code
    finally:
        os.environ.pop("WORLD_SIZE") if old is None else os.environ.update(WORLD_SIZE=old)
    return status, json.loads(out.getvalue()) if status == 0 else None, err.getvalue()
