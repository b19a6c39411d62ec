"""The recall variant and its metrics: disjoint splits by content, the object's colour read back
against the clip's own tuple, cue worth against plain PyTorch, prompted sampling against a loop
without the KV cache."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from localopt_plugin.data.procedural import NUM_CLASSES
from localopt_plugin.data.recall import (
    PALETTE,
    RecallSetting,
    recall_clip,
    render_recall_clip,
    render_recall_video,
)
from localopt_plugin.errors import UserError
from localopt_plugin.evaluation.recall import (
    latent_frame,
    object_colours,
    recall_scores,
    recoloured,
)


def _digests(split: str, count: int, first_seed: int) -> set[str]:
    setting = RecallSetting(split=split)
    return {hashlib.sha256(render_recall_video(i % NUM_CLASSES, first_seed + i, 65, 32,
                                               setting).tobytes()).hexdigest()
            for i in range(count)}


def test_splits_are_disjoint_by_content_whatever_the_seeds():
    # the bench's seeds: training from seed * 10**6, held-out clips from 500000
    train = _digests("train", 600, 10**6) | _digests("train", 600, 3 * 10**6)
    valid, reference = _digests("valid", 150, 500_000), _digests("reference", 150, 500_000)
    assert len(valid) > 100 and len(reference) > 100 and len(train) > 500
    assert not train & valid and not train & reference and not valid & reference
    # the same seeds in another split give other clips (the split is not the seed)
    assert _digests("train", 50, 500_000) != _digests("valid", 50, 500_000)


def test_the_colour_shows_only_outside_the_hiding_and_moves_on_while_hidden():
    setting = RecallSetting(colours=4, hide_start=17, hide_frames=32)
    clip, frames = recall_clip(5, 123, setting)
    ground = frames[20, 0, 0]
    assert np.all(frames[17:49] == ground)  # hidden: the flat ground only
    # the same tuple without hiding: identical outside the hidden frames (the motion goes on)
    shown = render_recall_clip(clip, 65, 32, RecallSetting(hide_start=100, hide_frames=1))
    assert np.array_equal(frames[:17], shown[:17]) and np.array_equal(frames[49:], shown[49:])
    assert not np.array_equal(frames[16], frames[49])
    # the object's pixels are the palette colour (anti-aliased edges aside)
    centre = np.abs(frames[0].astype(float) / 255 - PALETTE[clip.colour]).sum(-1) < 0.02
    assert centre.sum() > 50


@pytest.mark.parametrize("options, message", [
    ("colours=9", "colours must lie"), ("split=test", "split must be"),
    ("hide=0+4", "START >= 1"), ("shade=3", "unknown recall option"), ("colours=x", "bad")])
def test_bad_recall_options_are_refused_by_name(options, message):
    with pytest.raises(UserError, match=message):
        RecallSetting.parse(options)


def test_object_colours_read_back_each_clips_own_tuple():
    """Independent reference: the tuple that drew the clip (its colour; hidden frames none)."""
    setting = RecallSetting(split="valid", colours=6)
    for i in range(24):
        clip, frames = recall_clip(i % NUM_CLASSES, 900 + i, setting)
        colours = object_colours(frames, setting.colours)
        assert np.all(colours[17:49] == -1)
        assert np.all(colours[:17] == clip.colour) and np.all(colours[49:] == clip.colour)


def test_recall_scores_real_clips_one_swapped_cues_zero_through_the_tokenizer():
    from localopt_plugin.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("fsq-video-recall")
    setting = RecallSetting(split="reference")
    clips = [recall_clip(i % NUM_CLASSES, 40 + i, setting)[0] for i in range(12)]
    videos = [tokenizer.decode(tokenizer.encode(render_recall_clip(c, 65, 32, setting)))
              for c in clips]
    cues = [c.colour for c in clips]
    real = recall_scores(videos, setting, cues)
    assert real["recall accuracy"] == 1.0 and real["presence after hiding"] > 0.9
    assert real["presence per segment"][2] == 0.0  # frames 32-48: hidden
    swapped = recall_scores(videos, setting, [(c + 1) % setting.colours for c in cues])
    assert swapped["recall accuracy"] == 0.0  # the negative control
    # a clip whose object reappears in another colour does not recall
    changed = [np.concatenate([v[:49], tokenizer.decode(tokenizer.encode(render_recall_clip(
        recoloured(c, setting), 65, 32, setting)))[49:]]) for v, c in zip(videos, clips,
                                                                         strict=True)]
    assert recall_scores(changed, setting)["recall accuracy"] == 0.0
    # one that never hides the object keeps its colour without remembering it: no recall
    unhidden = RecallSetting(split="reference", hide_start=100, hide_frames=1)
    shown = [tokenizer.decode(tokenizer.encode(render_recall_clip(c, 65, 32, unhidden)))
             for c in clips]
    never = recall_scores(shown, setting, cues)
    assert never["colour kept after hiding"] == 1.0 and never["hid the object"] == 0.0
    assert never["recall accuracy"] == 0.0
    assert real["hid the object"] == 1.0 and real["colour kept after hiding"] == 1.0


def test_the_recall_codebook_holds_every_default_clip_and_maps_others_to_near_codes():
    from localopt_plugin.tokenizers import build_tokenizer

    full, compact = build_tokenizer("fsq-video"), build_tokenizer("fsq-video-recall")
    setting = RecallSetting(split="valid")
    clip = render_recall_video(7, 11, 65, 32, setting)
    ids = compact.encode(clip)
    assert np.array_equal(compact.codes[ids], full.encode(clip))  # no id replaced
    other = render_recall_video(7, 11, 21, 32, RecallSetting(hide_start=3, hide_frames=2))
    assert compact.encode(other).max() < compact.vocab_size  # refused by fsq-video-simple


def test_latent_frames_of_the_hiding():
    assert [latent_frame(f, 4) for f in (0, 1, 4, 5, 16, 17, 48, 49, 64)] == \
        [0, 1, 1, 2, 4, 5, 12, 13, 16]


def _tiny_model(vocab_size: int):
    """Preset "test": the shipped architecture (RoPE, RMSNorm, SwiGLU, GQA, untied)."""
    from helpers.configs import preset_model

    from localopt_plugin.model import build_gpt_model

    return build_gpt_model(preset_model(), vocab_size).eval()


def test_cue_worth_equals_plain_pytorch_cross_entropy_and_is_zero_for_the_same_cue(
        dist_world_of_one):
    from localopt_plugin.data.inputs import InputBuilder
    from localopt_plugin.data.layout import SampleLayout, Vocabulary
    from localopt_plugin.evaluation.recall import cue_worth
    from localopt_plugin.model import compute_logits, forward_hidden

    vocab = Vocabulary(video_vocab_size=20, num_classes=3)
    layout = SampleLayout(video_start=3, num_frames=6, frame_tokens=4)
    model = _tiny_model(vocab.size)
    rng = np.random.default_rng(0)
    true = rng.integers(20, size=(5, 6, 4))
    other = rng.integers(20, size=(5, 6, 4))
    labels = [0, 1, 2, 0, 1]
    builder = InputBuilder(vocab, layout)
    result = cue_worth(model, builder, true, other, labels, first_frame=4, cue_frames=2,
                       batch_size=2)

    def reference(tokens):  # whole sequences, logits, torch's cross-entropy over frames 4-5
        seq = torch.from_numpy(np.stack([builder(t, label, None)
                                         for t, label in zip(tokens, labels, strict=True)]))
        with torch.no_grad():
            logits = compute_logits(model, forward_hidden(model, seq, torch.arange(
                seq.shape[1]))).float()  # [s, b, padded vocab], as the training loss sees it
        first = layout.video_start + 4 * layout.frame_tokens
        targets = seq[:, first:first + 2 * layout.frame_tokens]
        predicted = logits[first - 1:first - 1 + 2 * layout.frame_tokens].permute(1, 2, 0)
        return F.cross_entropy(predicted, targets, reduction="none").sum(1).double()

    swapped = true.copy()
    swapped[:, :2] = other[:, :2]
    expected = reference(swapped) - reference(true)
    assert np.allclose(result["cue worth per clip"], expected.numpy(), atol=1e-4)
    assert result["cue worth (nats per clip)"] == pytest.approx(float(expected.mean()),
                                                                abs=1e-4)
    same = cue_worth(model, builder, true, true, labels, 4, 2)
    assert same["cue worth (nats per clip)"] == 0.0


def test_prompted_sampling_keeps_the_prompt_and_continues_it_greedily(dist_world_of_one):
    from localopt_plugin.data.layout import SampleLayout, Vocabulary
    from localopt_plugin.generation.generate import class_conditions
    from localopt_plugin.generation.sampling import (
        SamplingConfig,
        condition_prefix,
        sample_video_tokens,
    )
    from localopt_plugin.model import compute_logits, forward_hidden

    vocab = Vocabulary(video_vocab_size=20, num_classes=3)
    layout = SampleLayout(video_start=3, num_frames=5, frame_tokens=4)
    model = _tiny_model(vocab.size)
    prompt = torch.randint(20, (2, 2, 4), generator=torch.Generator().manual_seed(1))
    conditions = class_conditions(vocab, [1, 2])
    greedy = SamplingConfig(temperature=0.0)
    out = sample_video_tokens(model, vocab, layout, conditions, 5, greedy, prompt=prompt)
    assert torch.equal(out[:, :2], prompt)
    # reference: a plain loop, the whole sequence through the model for every token
    seq = torch.cat([condition_prefix(vocab, conditions), prompt.reshape(2, -1)], 1)
    with torch.no_grad():
        for _ in range(3 * 4):
            hidden = forward_hidden(model, seq, torch.arange(seq.shape[1]))
            logits = compute_logits(model, hidden[-1:])[0, :, :vocab.video_vocab_size]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.reshape(2, -1), seq[:, -5 * 4:])
    with pytest.raises(ValueError, match="prompt"):
        sample_video_tokens(model, vocab, layout, conditions, 5, greedy,
                            prompt=torch.zeros(2, 5, 4, dtype=torch.long))
