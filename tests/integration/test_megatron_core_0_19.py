"""The unit tests again on megatron-core 0.19, the version pip gives users on Python 3.12.

The README's environment (Python 3.11) has megatron-core 0.16.1, so without this test the
model, attention, recomputation, ReCo and window unit tests would only ever meet 0.16.1
(0.19 moved ``TransformerBlock._checkpointed_forward`` to a module function, which a test missed
until it was run there by hand). The Python 3.12 environment of
``tools/setup_megatron_lm_env.sh`` holds 0.19; CI creates it and sets
``LOCALOPT_REQUIRE_MEGATRON_LM=1``, so there a missing environment fails this test.

Run: the unit files that drive Megatron-Core's modules (model, attention, Local Opt.'s plans,
several windows, ReCo, generation's cache, FLOPs on the real model, checkpoints' configs).
Left out: the files no Megatron-Core version can change: data, tokenizers, video files, the
evaluation extras (which that environment does not install), window draws, flag parsing and the
command-line tests (the flags come from the plugin's own table of Megatron-LM's parser, not from
the installed one).
"""

from __future__ import annotations

import subprocess

import pytest
from helpers import launch
from helpers.launch import REPO, subprocess_env

pytestmark = pytest.mark.slow

WITH_MEGATRON_CORE = ("test_attention.py", "test_model.py", "test_local_opt.py",
                      "test_windows_per_step.py", "test_reco.py", "test_generation.py",
                      "test_flops.py", "test_checkpoint_config.py")


def test_unit_tests_pass_on_megatron_core_0_19():
    python = launch.megatron_lm_python()
    version = subprocess.run(
        [python, "-c", "from importlib.metadata import version; print(version('megatron-core'))"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, check=True)
    assert version.stdout.strip().splitlines()[-1].startswith("0.19"), version.stdout
    files = [f"tests/unit/{name}" for name in WITH_MEGATRON_CORE]
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=1200)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in summary and "failed" not in summary, summary
