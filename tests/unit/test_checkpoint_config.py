"""Checkpoints carry a versioned config: today's round-trips, older ones still load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from helpers.configs import train_args

from localopt_plugin.model import ModelConfig, compute_logits, forward_hidden
from localopt_plugin.training.config import (
    CONFIG_VERSION,
    dataset_from_saved,
    model_config_from_saved,
    resolve,
    seed_from_saved,
)
from localopt_plugin.training.convert import load_trained_model

V1 = Path(__file__).resolve().parents[1] / "data" / "checkpoint_v1"
PIPELINE_V1 = V1.parent / "pipeline_checkpoint_v1"


def _assert_logits_of_the_writing_code(model, fixture: Path) -> None:
    """The model's logits on the fixture's tokens are those its writing code gave."""
    expected = torch.load(fixture / "expected_logits.pt")
    tokens = expected["tokens"]
    with torch.no_grad():
        logits = compute_logits(model, forward_hidden(model, tokens,
                                                      torch.arange(tokens.shape[1])))
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)


def test_a_checkpoint_written_before_typed_configs_loads(dist_world_of_one):
    """Config version 1 (the flat flags): the model is rebuilt with today's defaults for the
    fields added since and gives the logits the code that wrote it gave."""
    model, meta = load_trained_model(str(V1))
    assert "version" not in meta["config"] and meta["iteration"] == 3
    config = model_config_from_saved(meta["config"])
    assert config.recompute_granularity is None  # a field added after version 1
    assert (config.swiglu, config.num_query_groups, config.position_embedding_type) == (
        True, 2, "rope")
    _assert_logits_of_the_writing_code(model, V1)
    name, dataset = dataset_from_saved(meta["config"])
    assert name == "synthetic-video-tokens" and dataset.frames == 3
    assert seed_from_saved(meta["config"]) == 1234


def test_a_pipeline_checkpoint_of_the_layout_before_gptmodel_stages_converts(dist_world_of_one):
    """A PP=2 checkpoint written when each transformer layer was its own DeepSpeed layer
    (tests/data/README.md) converts to the GPTModel whose logits the code that wrote it gave."""
    model, meta = load_trained_model(str(PIPELINE_V1))
    assert meta["iteration"] == 2
    _assert_logits_of_the_writing_code(model, PIPELINE_V1)


def test_todays_config_round_trips_and_tolerates_added_and_removed_fields():
    config, _ = resolve(train_args("--preset", "test", "--recompute-activations",
                                   "--synthetic-frames", "3"), world_size=1)
    saved = config.to_dict()
    assert saved["version"] == CONFIG_VERSION
    assert model_config_from_saved(saved) == config.model
    older = dict(saved, model={k: v for k, v in saved["model"].items()
                               if k != "recompute_granularity"})
    assert model_config_from_saved(older) == dataclasses.replace(config.model,
                                                                 recompute_granularity=None)
    newer = dict(saved, model={**saved["model"], "a_field_from_the_future": 1})
    assert model_config_from_saved(newer) == config.model
    name, dataset = dataset_from_saved(saved)
    assert name == "synthetic-video-tokens" and dataset.frames == 3
    assert isinstance(config.model, ModelConfig) and config.seq_length == 3 + 3 * 64 - 1 + 1


V1_FLAGS = ("--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--synthetic-frames", "3", "--synthetic-frame-tokens", "8",
            "--synthetic-codebook-size", "32", "--synthetic-num-classes", "4",
            "--objective", "local-opt", "--regularizer", "reco", "--load", str(V1))


def test_a_resumed_run_keeps_the_reco_form_its_checkpoint_trained_with():
    """The version 1 checkpoint trained ReCo on the final states (before --reco-states
    existed); resuming it without --reco-states keeps that, saying so; the flag changes it; a
    fresh run gets today's default, the pre-norm form."""
    from helpers.launch import dry_run

    status, resumed, _ = dry_run(list(V1_FLAGS))
    assert status == 0 and resumed["regularizers"]["reco"]["states"] == "final"
    assert any(note.startswith("--reco-states final: the checkpoint's setting")
               for note in resumed["flag notes"])
    status, changed, _ = dry_run([*V1_FLAGS, "--reco-states", "pre-norm"])
    assert status == 0 and changed["regularizers"]["reco"]["states"] == "pre-norm"
    assert not any("--reco-states" in note for note in changed["flag notes"])
    status, fresh, _ = dry_run(list(V1_FLAGS[:-2]))
    assert status == 0 and fresh["regularizers"]["reco"]["states"] == "pre-norm"
