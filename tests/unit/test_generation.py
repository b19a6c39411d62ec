"""Sampling: the KV cache changes no token, filters and guidance, chunked positions, and
playable videos from a checkpoint trained by the main job."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.configs import preset_model
from helpers.fsq_checkpoint import FRAMES, SIZE, train_fsq_checkpoint

from localopt_plugin.data.layout import SampleLayout, Vocabulary
from localopt_plugin.generation import sampling
from localopt_plugin.generation.sampling import (
    SamplingConfig,
    draw_tokens,
    filter_logits,
    sample_video_tokens,
)

VOCAB = Vocabulary(64, num_classes=4)
LAYOUT = SampleLayout(video_start=3, num_frames=4, frame_tokens=16)


@pytest.fixture(scope="module")
def model(dist_world_of_one):
    from localopt_plugin.model import build_gpt_model

    # the shipped presets' architecture (RoPE, RMSNorm, SwiGLU, GQA, no bias, untied); a larger
    # init std gives peaked distributions, so a wrong cache would change tokens
    config = preset_model("test", init_method_std=0.2)
    assert config.group_query_attention and config.untie_embeddings_and_output_weights
    return build_gpt_model(config, VOCAB.size).eval()


def _conditions(labels=(0, 1, 3)) -> torch.Tensor:
    return torch.tensor([[VOCAB.class_token(i)] for i in labels])


def _sample(model, config, seed=0, **kwargs) -> torch.Tensor:
    return sample_video_tokens(model, VOCAB, LAYOUT, _conditions(), LAYOUT.num_frames, config,
                               torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("mode", ["full", "chunked"])
@pytest.mark.parametrize("config", [
    SamplingConfig(),
    SamplingConfig(temperature=0.8, top_k=12, top_p=0.9, cfg_scale=3.0),
], ids=["plain", "cfg-topk-topp"])
def test_kv_cached_sampling_equals_uncached(model, mode, config):
    kwargs = {"mode": mode, "chunk_frames": 2}
    cached = _sample(model, config, use_cache=True, **kwargs)
    uncached = _sample(model, config, use_cache=False, **kwargs)
    assert cached.shape == (3, LAYOUT.num_frames, LAYOUT.frame_tokens)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, _sample(model, config, seed=1, **kwargs))  # seed matters
    assert len(cached.unique()) > 10  # a real distribution, not a constant


def test_cached_step_logits_equal_recomputed_logits(model):
    prefix = sampling.condition_prefix(VOCAB, _conditions())
    cached, full = sampling._Stepper(model, True), sampling._Stepper(model, False)
    torch.testing.assert_close(cached.start(prefix, 64), full.start(prefix, 64))
    for ids in torch.randint(0, 64, (20, 3), generator=torch.Generator().manual_seed(0)):
        torch.testing.assert_close(cached.step(ids, 64), full.step(ids, 64),
                                   rtol=1e-5, atol=1e-5)


def test_only_video_ids_are_sampled(model, monkeypatch):
    real = sampling.compute_logits

    def special_ids_preferred(m, hidden):
        logits = real(m, hidden)
        logits[..., VOCAB.video_vocab_size:] += 100.0  # BOS, BOV, EOV, classes, padding
        return logits

    monkeypatch.setattr(sampling, "compute_logits", special_ids_preferred)
    tokens = _sample(model, SamplingConfig(temperature=2.0, cfg_scale=2.0))
    assert int(tokens.max()) < VOCAB.video_vocab_size and int(tokens.min()) >= 0


def test_filters_and_greedy():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)
    assert torch.isfinite(filter_logits(logits, top_k=2)).sum() == 2
    probs = logits.exp()[0]  # 0.64, 0.23, 0.09, ...: the 0.8 nucleus is the first two
    nucleus = torch.isfinite(filter_logits(logits, top_p=0.8))[0]
    assert nucleus.tolist() == [True, True, False, False, False] and probs[:2].sum() > 0.8
    assert draw_tokens(logits, SamplingConfig(temperature=0), None).item() == 0
    g = torch.Generator().manual_seed(0)
    draws = draw_tokens(logits.expand(500, -1), SamplingConfig(top_k=3), g)
    freq = torch.bincount(draws, minlength=5).float() / 500
    assert freq[3:].sum() == 0
    expected = probs[:3] / probs[:3].sum()
    assert torch.allclose(freq[:3], expected, atol=0.06), (freq, expected)


def test_guidance_combines_conditional_and_unconditional_logits(model, monkeypatch):
    """With a huge scale, guidance follows cond - uncond: distinct from both branches."""
    config = SamplingConfig(temperature=0, cfg_scale=4.0)
    seen = []
    real = sampling.draw_tokens

    def record(logits, cfg, generator):
        seen.append(logits.clone())
        return real(logits, cfg, generator)

    monkeypatch.setattr(sampling, "draw_tokens", record)
    _sample(model, config, mode="full")
    first = seen[0]
    from localopt_plugin.model import compute_logits, forward_hidden

    prefix = sampling.condition_prefix(VOCAB, _conditions())
    null = sampling.condition_prefix(VOCAB, sampling.null_conditions(VOCAB, LAYOUT, 3))
    with torch.no_grad():
        cond, uncond = (compute_logits(model, forward_hidden(model, p, torch.arange(3)))[
            -1, :, :VOCAB.video_vocab_size] for p in (prefix, null))
    torch.testing.assert_close(first, uncond + 4.0 * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_chunked_generation_restarts_positions(model):
    """Chunks re-position from 0: 6 frames fit a model whose positions cover 4 frames."""
    short = SampleLayout(3, 6, 16)
    old = model.max_sequence_length
    model.max_sequence_length = 3 + 4 * 16  # the 2 + 2-frame chunk layout, not 6 frames
    try:
        with pytest.raises(ValueError, match="max-position-embeddings"):
            sample_video_tokens(model, VOCAB, short, _conditions(), 6, SamplingConfig(), None)
        tokens = sample_video_tokens(model, VOCAB, short, _conditions(), 6, SamplingConfig(),
                                     torch.Generator().manual_seed(0), mode="chunked",
                                     chunk_frames=2)
    finally:
        model.max_sequence_length = old
    assert tokens.shape == (3, 6, 16)


def test_prompts_are_tokenized_like_the_loader(tmp_path):
    import sentencepiece
    from helpers.wds_shards import train_text_model, write_dataset

    from localopt_plugin.data.inputs import InputBuilder
    from localopt_plugin.generation.generate import prompt_conditions

    model_file = train_text_model(tmp_path / "text.model")
    manifest = write_dataset(tmp_path / "d", 2, 2, text_model=model_file).manifest
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    # the loader's builder gets the processor from the model bytes
    builder = InputBuilder(manifest.vocab, manifest.layout,
                           sentencepiece.SentencePieceProcessor(
                               model_proto=model_file.read_bytes()))
    prompts = ["a red ball rolls left", "the green lake and a small dog runs after the cat"]
    ours = prompt_conditions(manifest.vocab, manifest.layout, processor, prompts)
    loader = [builder.condition(-1, p, False) for p in prompts]
    assert ours.tolist() == [ids.tolist() for ids in loader]
    null = sampling.null_conditions(manifest.vocab, manifest.layout, 1)[0]
    assert null.tolist() == builder.condition(-1, None, True).tolist()


def test_generate_cli_writes_playable_mp4_from_trained_checkpoint(tmp_path_factory,
                                                                   dist_world_of_one):
    from localopt_plugin.commands.generate import main
    from localopt_plugin.video.io import read_video

    ckpt, manifest = train_fsq_checkpoint(tmp_path_factory.getbasetemp() / "fsq")
    out = tmp_path_factory.mktemp("samples")
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--class-labels", "0", "7",
                 "--top-k", "50", "--cfg-scale", "2", "--no-progress"]) == 0
    for name in ("class00_00", "class07_00"):
        video = read_video(out / f"{name}.mp4")  # decoded back with PyAV
        assert video.shape == (FRAMES, SIZE, SIZE, 3)
        assert (out / f"{name}.gif").stat().st_size > 0
    assert (out / "grid.png").exists()
    tokens = np.load(out / "tokens.npy")
    assert tokens.shape == (2, *manifest.latent_grid[:1], manifest.frame_tokens)
    assert json.loads((out / "samples.json").read_text())["iteration"] == 2
    # chunked mode (the fewer-frames baseline's inference) through the CLI as well
    chunked = tmp_path_factory.mktemp("chunked")
    assert main(["--checkpoint", str(ckpt), "--out", str(chunked), "--class-labels", "3",
                 "--mode", "chunked", "--chunk-frames", "1", "--no-progress"]) == 0
    assert read_video(chunked / "class03_00.mp4").shape == (FRAMES, SIZE, SIZE, 3)


@pytest.mark.parametrize("bad", [dict(cfg_scale=float("nan")), dict(cfg_scale=-1.0),
                                 dict(cfg_scale=float("inf")), dict(temperature=float("nan")),
                                 dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0)])
def test_sampling_config_refuses_bad_settings(bad):
    with pytest.raises(ValueError, match="need temperature >= 0"):
        SamplingConfig(**bad)
    SamplingConfig(cfg_scale=0.0)  # 0: the null condition alone, a valid (if odd) choice
