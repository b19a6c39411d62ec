"""One plugin configuration for both entry points: a bad window, ReCo or dataset setting stops
``localopt-train`` and Megatron-LM's ``pretrain()`` before any process group starts, with one
line naming the flag; the same flags give both the same first iteration.

"Before any process group" is shown by the launch environment: RANK 0 of a WORLD_SIZE 2 job
whose rendezvous address answers nobody, so a run that reached process-group initialisation
would wait there until the subprocess timeout, not exit with the error line.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import launch
from helpers.launch import MEGATRON_LM_CPU_FLAGS, REPO, TRAIN_MODULE, subprocess_env

from localopt_plugin.model.presets import megatron_flags

WAITING_RENDEZVOUS = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}
DATA = ("--dataset", "synthetic-video-tokens", "--synthetic-frames", "4",
        "--synthetic-frame-tokens", "16", "--synthetic-codebook-size", "64",
        "--synthetic-num-classes", "4")
RUN = ("--objective", "local-opt", "--regularizer", "reco", "--micro-batch-size", "1",
       "--global-batch-size", "2", "--train-iters", "2", "--seed", "1234")
# (bad flags, the start of the one error line): one per config
BAD = {
    "window": (("--local-opt-window-frames", "9"),
               "--local-opt-window-frames 9 exceeds the 4 latent frames"),
    "reco": (("--reco-weight", "-1"), "--reco-weight must be >= 0"),
    "dataset": (("--synthetic-frame-tokens", "0"), "--synthetic-frame-tokens must be >= 1"),
}
SEQ = ("--seq-length", str(3 + 4 * 16 - 1), "--max-position-embeddings", str(3 + 4 * 16 - 1))
MEGATRON_ONLY = (*MEGATRON_LM_CPU_FLAGS, "--clip-grad", "0")


def _fails_with_one_line(cmd: list[str], message: str) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(**WAITING_RENDEZVOUS),
                          capture_output=True, text=True, timeout=180)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("setting", sorted(BAD))
def test_localopt_train_refuses_a_bad_setting_before_any_process_group(setting):
    flags, message = BAD[setting]
    _fails_with_one_line([sys.executable, "-m", TRAIN_MODULE, "--preset", "test", *DATA, *RUN,
                          *flags], message)


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(BAD))
def test_pretrain_refuses_a_bad_setting_before_any_process_group(setting):
    flags, message = BAD[setting]
    _fails_with_one_line([launch.megatron_lm_python(),
                          str(REPO / "examples" / "pretrain_video_gpt.py"),
                          *megatron_flags("test"), *DATA, *RUN, *SEQ, *MEGATRON_ONLY, *flags],
                         message)
