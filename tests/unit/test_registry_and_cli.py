"""Registry lookups, third-party entry points, and the trainer's command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
from helpers.configs import train_args
from helpers.launch import REPO, TRAIN_MODULE, subprocess_env

from localopt_plugin import registry
from localopt_plugin.errors import UserError
from localopt_plugin.training.config import resolve


def test_builtin_components_are_registered():
    assert {"full-sequence", "local-opt", "fewer-frames"} <= set(registry.names("objective"))
    assert {"first-frame-balanced", "uniform"} <= set(registry.names("window_sampler"))
    assert "synthetic-video-tokens" in registry.names("dataset")


def test_unknown_name_lists_registered_names():
    with pytest.raises(registry.UnknownComponentError) as err:
        registry.get("objective", "no-such-loss")
    message = str(err.value)
    assert "no-such-loss" in message and "local-opt" in message and "full-sequence" in message
    from localopt_plugin.errors import UserError

    assert isinstance(err.value, UserError)  # the commands print it as one error line
    with pytest.raises(ValueError, match="kinds are"):
        registry.get("no-such-kind", "x")


def test_register_rejects_a_second_component_under_the_same_name():
    registry.register("objective", "test-dup")(dict)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("objective", "test-dup")(list)


def _run(*cmd, env=None, check=True):
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=subprocess_env(**(env or {})))
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_help_lists_megatron_and_plugin_flags():
    out = _run(sys.executable, "-m", TRAIN_MODULE, "--help").stdout
    for flag in ("--num-layers", "--hidden-size", "--seq-length", "--micro-batch-size",
                 "--global-batch-size", "--lr-decay-style", "--tensor-model-parallel-size",
                 "--pipeline-model-parallel-size", "--tensorboard-dir", "--deepspeed_config",
                 "--zero-stage", "--objective", "--local-opt-window-frames",
                 "--local-opt-first-window-prob", "--regularizer", "--dataset"):
        assert flag in out, flag


def test_help_lists_every_flag_of_the_previous_command_line():
    """Every flag localopt-train had before typed configs (tests/data/train_flags_v1.txt,
    from its --help at commit cf3e4f3) is still there."""
    out = _run(sys.executable, "-m", TRAIN_MODULE, "--help").stdout
    listed = set(re.findall(r"(--[a-zA-Z0-9_-]+)", out))
    previous = set((REPO / "tests" / "data" / "train_flags_v1.txt").read_text().split())
    assert previous <= listed, sorted(previous - listed)


def test_unknown_objective_fails_with_valid_names():
    proc = _run(sys.executable, "-m", TRAIN_MODULE, "--objective", "nope",
                check=False)
    assert proc.returncode != 0
    assert "unknown objective 'nope'" in proc.stderr and "local-opt" in proc.stderr


def test_third_party_component_found_through_entry_point(tmp_path):
    """A tiny distribution on sys.path declaring the localopt_plugin.components entry point."""
    (tmp_path / "thirdparty_loss.py").write_text(textwrap.dedent("""
        from localopt_plugin.registry import register

        @register("objective", "thirdparty-loss")
        class ThirdPartyLoss:
            pass
    """))
    dist_info = tmp_path / "thirdparty_loss-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: thirdparty-loss\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[localopt_plugin.components]\nthirdparty = thirdparty_loss\n")
    env = {"PYTHONPATH": str(tmp_path)}
    code = "from localopt_plugin import registry; print(registry.names('objective'))"
    assert "thirdparty-loss" in _run(sys.executable, "-c", code, env=env).stdout
    # and the trainer accepts it by name (validation happens before any model is built)
    proc = _run(sys.executable, "-m", TRAIN_MODULE, "--objective", "nope",
                env=env, check=False)
    assert "thirdparty-loss" in proc.stderr


def _resolve(*flags, world_size=1):
    """The run's resolved configuration (no process group, no model)."""
    return resolve(train_args(*flags), world_size)[0]


def test_batch_flags_and_deepspeed_json_must_agree(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "train_batch_size": 16}))
    with pytest.raises(UserError, match="--micro-batch-size 2 disagrees with DeepSpeed "
                       "config train_micro_batch_size_per_gpu=4"):
        _resolve("--deepspeed_config", str(config), "--micro-batch-size", "2", world_size=2)
    resolved = _resolve("--deepspeed_config", str(config), world_size=2)
    assert (resolved.micro_batch_size, resolved.global_batch_size,
            resolved.gradient_accumulation_steps) == (4, 16, 2)
    assert resolved.deepspeed.config["gradient_accumulation_steps"] == 2
    with pytest.raises(UserError, match="not divisible"):
        _resolve("--micro-batch-size", "3", "--global-batch-size", "8", world_size=2)


def test_zero3_with_pipeline_is_refused_with_advice():
    with pytest.raises(UserError, match="use --zero-stage 1"):
        _resolve("--pipeline-model-parallel-size", "2", "--num-layers", "2", "--zero-stage",
                 "3", world_size=2)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "ds_configs").glob("*.json")))
def test_shipped_deepspeed_configs_are_valid(name):
    cfg = _resolve("--deepspeed_config", str(REPO / "ds_configs" / name),
                   world_size=2).deepspeed.config
    assert cfg["train_batch_size"] == (
        cfg["train_micro_batch_size_per_gpu"] * 2 * cfg["gradient_accumulation_steps"])


def test_zero3_with_a_window_per_micro_batch_is_refused():
    with pytest.raises(UserError, match="--local-opt-window-scope step"):
        _resolve("--objective", "local-opt", "--local-opt-window-scope", "micro-batch",
                 "--zero-stage", "3", world_size=2)
    assert _resolve("--objective", "local-opt", "--zero-stage", "3",
                    world_size=2).plugin.window.scope == "step"


def test_presets_are_defaults_that_flags_override():
    resolved = _resolve("--preset", "110m", "--num-layers", "3")
    assert (resolved.model.num_layers, resolved.model.hidden_size) == (3, 768)
    assert resolved.model.swiglu and resolved.model.group_query_attention
