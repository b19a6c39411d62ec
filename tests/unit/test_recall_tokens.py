"""The token-level recall task: its data, splits and scores, with controls that must fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from localopt_plugin.data.recall_tokens import (
    SPLITS,
    RecallTokens,
    RecallTokensConfig,
    split_cues,
)
from localopt_plugin.errors import UserError
from localopt_plugin.evaluation import recall_tokens as scores


def test_frames_hide_the_cue_then_show_it_again():
    task = RecallTokensConfig(frames=9, grid=4, colours=4, parts=4, cue_frames=2, gap=5)
    cue = np.array([3, 1, 0, 2])
    frames = task.frames_of(cue)
    blocks = frames[0].reshape(4, 4)
    assert (blocks[:2, :2] == 3).all() and (blocks[:2, 2:] == 1).all()
    assert (blocks[2:, :2] == 0).all() and (blocks[2:, 2:] == 2).all()
    assert (frames[1] == frames[0]).all() and (frames[2:7] == task.occluder).all()
    assert (frames[7] == frames[0]).all() and (frames[8] == frames[0]).all()
    assert task.lead_tokens().tolist() == [0, 2, 8, 10]


def test_splits_are_disjoint_and_cover_every_cue():
    task = RecallTokensConfig()
    parts = {s: set(split_cues(task, s).tolist()) for s in SPLITS}
    assert sum(map(len, parts.values())) == task.colours ** task.parts
    assert not (parts["train"] & parts["test"]) and not (parts["train"] & parts["valid"])
    # the training samples hold only training cues (their content, not their index)
    train = RecallTokens(task, "train", 300, seed=1)
    held_out = {tuple(task.frames_of(task.cue(c))[0]) for c in parts["test"] | parts["valid"]}
    assert all(tuple(train[i]["tokens"][3:3 + 16].tolist()) not in held_out for i in range(300))


@pytest.mark.parametrize(("flags", "message"), [
    ({"parts": 3}, "must be a square"), ({"gap": 8}, "use more frames"),
    ({"colours": 2, "parts": 4}, "fewer than the 20")])
def test_bad_settings_are_refused_naming_the_flag(flags, message):
    with pytest.raises(UserError, match=message):
        RecallTokensConfig(**flags).validate()


def test_lead_accuracy_and_cue_worth_against_controls():
    """Logits that put all mass on the true next token recall every cue (1.0); on the shifted
    cue's tokens, none (0.0): the real-clip and colour-swapped controls."""
    task = RecallTokensConfig()
    cues = split_cues(task, "test")
    tokens = scores.cue_tokens(task, cues)
    vocab = task.vocabulary().size
    positions = scores._label_positions(task, task.reappear)

    def one_hot(next_tokens):
        logits = torch.full((*tokens.shape[:1], tokens.shape[1] - 1, vocab), -30.0)
        logits.scatter_(-1, next_tokens[:, 1:].unsqueeze(-1), 30.0)
        return logits

    assert scores._lead_accuracy(one_hot(tokens), tokens, positions) == 1.0
    other = scores.cue_tokens(task, scores.shifted_cues(task, cues))
    assert scores._lead_accuracy(one_hot(other), tokens, positions) == 0.0
    assert (scores.shifted_cues(task, cues) != cues).all()


def test_scores_of_a_real_model_against_its_own_forward(dist_world_of_one):
    """Recall accuracy and cue worth recomputed here from GPTModel's own forward (Megatron's
    path, not the plugin's forward_hidden), and attention to the cue from probabilities whose
    weighted values reproduce each core attention's real output."""
    import dataclasses

    from localopt_plugin.model import build_gpt_model
    from localopt_plugin.model.presets import config_with_flags

    task = RecallTokensConfig()
    config = dataclasses.replace(config_with_flags("test", ""),
                                 max_position_embeddings=task.layout().seq_length)
    model = build_gpt_model(config, task.vocabulary().size, seed=3)
    model.eval()
    got = scores.recall_token_scores(model, task)
    cues = split_cues(task, "test")
    tokens = scores.cue_tokens(task, cues)
    length = tokens.shape[1] - 1
    with torch.no_grad():
        logits = model(tokens[:, :length], torch.arange(length).expand(len(cues), -1),
                       attention_mask=None)
    positions = scores._label_positions(task, task.reappear)
    want = (logits[:, positions].argmax(-1) == tokens[:, positions + 1]).float().mean()
    assert got["recall accuracy"] == pytest.approx(float(want))
    start = task.layout().label_span(task.reappear, 1)[0]
    other = scores.cue_tokens(task, scores.shifted_cues(task, cues))
    cut = task.layout().video_start + task.cue_frames * task.frame_tokens
    other[:, cut:] = tokens[:, cut:]
    nll = []
    for seq in (tokens, other):
        with torch.no_grad():
            out = model(seq[:, :length], torch.arange(length).expand(len(cues), -1),
                        attention_mask=None)
        lp = torch.log_softmax(out.float(), -1)[:, start:start + task.frame_tokens]
        nll.append(-lp.gather(-1, seq[:, start + 1:start + 1 + task.frame_tokens, None]).sum(
            (1, 2)))
    assert got["cue worth (nats per clip)"] == pytest.approx(float((nll[1] - nll[0]).mean()),
                                                             rel=1e-4, abs=1e-4)
    # the recomputed probabilities reproduce each layer's core attention output
    outputs, inputs = [], []

    def keep(module, args, output):
        inputs.append(args[2])  # the values
        outputs.append(output)

    hooks = [layer.self_attention.core_attention.register_forward_hook(keep)
             for layer in model.decoder.layers]
    probabilities = scores.attention_probabilities(model, tokens[:, :length])
    for hook in hooks:
        hook.remove()
    for p, value, out in zip(probabilities, inputs, outputs, strict=True):
        value = value.repeat_interleave(p.shape[1] // value.shape[2], dim=2)
        mixed = torch.einsum("bhqk,kbhd->qbhd", p, value.float()).reshape(out.shape)
        assert torch.allclose(mixed, out.float(), atol=1e-5)
    assert 0.0 <= got["attention to the cue"] <= 1.0
