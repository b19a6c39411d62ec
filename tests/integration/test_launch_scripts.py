"""Every launch script in launch/ is parsed and dry-run (no training), and the
dry-run's parameter count equals a real GPTModel's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.configs import tiny_model
from helpers.launch import REPO, subprocess_env
from helpers.wds_shards import write_dataset

from localopt_plugin.model import build_gpt_model
from localopt_plugin.training.dry_run import parameter_count

# script -> (environment, the world size it implies)
SCRIPTS = {
    "train_single_node.sh": ({"GPUS": "8"}, 8),
    "train_multi_node.sh": ({"HOSTFILE": "HOSTFILE_PATH"}, 16),  # 2 hosts x 8 slots
    "train_slurm.sbatch": ({"SLURM_NNODES": "4", "GPUS_PER_NODE": "8"}, 32),
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    write_dataset(directory, num_samples=8, per_shard=4)
    return directory


def _dry_run(script, env, extra=()):
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / script), *extra], cwd=REPO,
        capture_output=True, text=True, timeout=300,
        env=subprocess_env(DRY_RUN="1", PYTHON=sys.executable, **env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize(("model", "low", "high"), [("110m", 80e6, 140e6),
                                                    ("770m", 650e6, 850e6)])
def test_scripts_dry_run(shards, tmp_path, script, model, low, high):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    script_env, world = SCRIPTS[script]
    env = {k: (str(hostfile) if v == "HOSTFILE_PATH" else v) for k, v in script_env.items()}
    env.update(MODEL=model, DATA_PATH=str(shards / "d-{000000..000001}.tar"), TP="2",
               GLOBAL_BATCH="64", MICRO_BATCH="2")
    summary = _dry_run(script, env)
    assert summary["world size"] == world
    assert summary["parallel layout (tp, pp, cp, dp)"] == [2, 1, 1, world // 2]
    if model == "110m":  # CP=2: context parallelism as the scripts pass it (12 heads, 4 groups)
        layout = _dry_run(script, {**env, "CP": "2"})["parallel layout (tp, pp, cp, dp)"]
        assert layout == [2, 1, 2, world // 4]
    assert summary["objective"] == "local-opt" and list(summary["regularizers"]) == ["reco"]
    reco = summary["regularizers"]["reco"]  # the scripts train ReCo's best-known form
    assert (reco["states"], reco["reduction"], reco["weight"]) == ("pre-norm", "sum", 0.1)
    ds = summary["deepspeed"]
    assert ds["train_batch_size"] == 64 and ds["bf16"]["enabled"]
    assert ds["gradient_accumulation_steps"] == 64 // (2 * world // 2)
    assert low < summary["parameters"] < high


def test_dry_run_rejects_inconsistent_batch(shards):
    proc = subprocess.run(
        ["bash", str(REPO / "launch/train_single_node.sh")], cwd=REPO,
        capture_output=True, text=True, timeout=300,
        env=subprocess_env(DRY_RUN="1", PYTHON=sys.executable, GPUS="8", MODEL="tiny",
                           DATA_PATH=str(shards / "d-000000.tar"), GLOBAL_BATCH="20",
                           MICRO_BATCH="2"))
    assert proc.returncode != 0
    assert "global batch size 20 is not divisible by micro batch size 2 x data-parallel " \
           "size 8" in proc.stderr


@pytest.mark.parametrize("flags", [
    (),
    ("--position-embedding-type", "rope", "--swiglu", "--normalization", "RMSNorm",
     "--untie-embeddings-and-output-weights", "--disable-bias-linear"),
    ("--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "96"),
])
def test_parameter_count_matches_a_built_gptmodel(dist_world_of_one, flags):
    config = tiny_model(*flags)
    model = build_gpt_model(config, vocab_size=100)
    assert parameter_count(config, 100, 1, 256) == sum(p.numel() for p in model.parameters())
