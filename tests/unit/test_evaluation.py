"""Evaluation: Frechet distance against an independent computation, FVD through a TorchScript
stand-in for I3D, flow consistency, and the NLL-per-frame curve (math and CLI)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers.configs import preset_model, tiny_args, tiny_model
from helpers.fsq_checkpoint import train_fsq_checkpoint

from localopt_plugin.data.procedural import render_video
from localopt_plugin.evaluation.flow import flow_warping_error
from localopt_plugin.evaluation.fvd import (
    feature_stats,
    frechet_distance,
    fvd,
    i3d_features,
    load_i3d,
)


def reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Independent: np.cov (population) and Tr sqrt(A^1/2 B A^1/2) through eigendecompositions."""
    import scipy.linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False, bias=True), np.cov(b, rowvar=False, bias=True)
    w, v = scipy.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = scipy.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


class StandInI3D(torch.nn.Module):
    """A tiny feature extractor with I3D's TorchScript call signature; checks its input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(3, 6, kernel_size=(2, 32, 32), stride=(2, 32, 32))

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if x.shape[1] != 3 or x.shape[3] != 224 or x.shape[4] != 224:
            raise ValueError("expected [B, 3, T, 224, 224]")
        if bool(x.min() < -1.0) or bool(x.max() > 1.0) or rescale or resize:
            raise ValueError("expected inputs already scaled to [-1, 1] and resized")
        if not return_features:
            raise ValueError("FVD needs the features")
        return torch.tanh(self.conv(x)).mean(dim=(2, 3, 4)) * 3.0


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_standin.pt"
    torch.jit.script(StandInI3D()).save(str(path))
    return path


def _videos(classes, seed0, frames=8, size=32):
    return [render_video(c, seed=seed0 + i, num_frames=frames, size=size)
            for i, c in enumerate(classes)]


def test_frechet_distance_matches_independent_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(30, 6)) @ rng.normal(size=(6, 6)) + 0.5
    ours = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert ours == pytest.approx(reference_frechet(a, b), rel=1e-6)
    assert ours == pytest.approx(frechet_distance(*feature_stats(b), *feature_stats(a)),
                                 rel=1e-6)  # symmetric
    assert frechet_distance(*feature_stats(a), *feature_stats(a)) == pytest.approx(0, abs=1e-6)
    assert ours > 1.0


def test_fvd_from_torchscript_features(i3d_file):
    detector = load_i3d(str(i3d_file))
    real, fake = _videos(range(12), 0), _videos([0] * 12, 100)  # 12 classes vs one class
    features_real = i3d_features(detector, real, batch_size=5)
    features_fake = i3d_features(detector, fake, batch_size=5)
    assert features_real.shape == (12, 6)
    value = fvd(detector, real, fake, batch_size=5)
    assert value == pytest.approx(reference_frechet(features_real, features_fake), rel=1e-6)
    assert value > 0.01
    assert fvd(detector, real, real) == pytest.approx(0, abs=1e-6)


def test_fvd_needs_the_i3d_file(tmp_path):
    from localopt_plugin.commands.evaluate import main

    with pytest.raises(FileNotFoundError, match="i3d_torchscript.pt"):
        load_i3d(str(tmp_path / "missing.pt"))
    with pytest.raises(SystemExit, match="not found"):
        main(["fvd", "--i3d", str(tmp_path / "missing.pt"), "--real", str(tmp_path),
              "--generated", str(tmp_path)])


def test_fvd_cli_on_mp4_directories(tmp_path, i3d_file):
    from localopt_plugin.commands.evaluate import main
    from localopt_plugin.video.io import read_video, write_mp4

    for name, videos in (("real", _videos(range(6), 0)), ("gen", _videos([4] * 6, 50))):
        for i, video in enumerate(videos):
            write_mp4(tmp_path / name / f"{i}.mp4", video)
    out = tmp_path / "fvd.json"
    main(["fvd", "--i3d", str(i3d_file), "--real", str(tmp_path / "real"), "--generated",
          str(tmp_path / "gen"), "--num-frames", "8", "--out", str(out)])
    result = json.loads(out.read_text())
    decoded = [[read_video(tmp_path / name / f"{i}.mp4") for i in range(6)]
               for name in ("real", "gen")]
    assert result["fvd"] == pytest.approx(fvd(load_i3d(str(i3d_file)), *decoded), rel=1e-6)
    assert (result["num_real"], result["num_generated"]) == (6, 6)


@pytest.mark.parametrize("class_id", [0, 5, 10])
def test_flow_consistency_is_worse_for_shuffled_frames(class_id):
    video = render_video(class_id, seed=7, num_frames=12, size=64)
    shuffled = video[np.random.default_rng(class_id).permutation(len(video))]
    original, broken = flow_warping_error(video), flow_warping_error(shuffled)
    assert original < 0.5 * broken, (original, broken)


def _synthetic_validation(model_config, batch_size: int, count: int, *flags: str):
    """A synthetic-video-tokens dataset (``flags``), a fresh model on it and ``count``
    validation batches."""
    from localopt_plugin import registry
    from localopt_plugin.model import build_gpt_model

    args = tiny_args(*flags)
    source = registry.build("dataset", "synthetic-video-tokens",
                            registry.config_from_args("dataset", "synthetic-video-tokens", args),
                            seed=args.seed)
    model = build_gpt_model(model_config, source.vocab.size).eval()
    batches = [b["tokens"] for b, _ in zip(source.valid.batches(batch_size, 0, 1, seed=0),
                                           range(count), strict=False)]
    return source, model, batches


def test_nll_per_frame_matches_the_full_sequence_loss(dist_world_of_one):
    from localopt_plugin.evaluation.nll import nll_per_position
    from localopt_plugin.objectives.sequence import FullSequence

    source, model, batches = _synthetic_validation(tiny_model(), 3, 2)
    result = nll_per_position(model, source.layout, batches)
    assert len(result["per_frame_nll"]) == source.layout.num_frames
    assert len(result["per_position_nll"]) == source.layout.num_frames * 16
    with torch.no_grad():
        loss = np.mean([FullSequence(source.layout)(model, t).loss.item() for t in batches])
    assert result["mean_nll"] == pytest.approx(loss, rel=1e-5)
    assert np.mean(result["per_frame_nll"]) == pytest.approx(loss, rel=1e-5)
    assert result["num_samples"] == 6


def test_nll_per_segment_of_a_long_sample(dist_world_of_one):
    """9 latent frames (33-frame clips): two 17-frame segments of 5 latent frames sharing the
    middle one, each the mean NLL of its tokens (the shipped architecture)."""
    from localopt_plugin.evaluation.nll import nll_per_position

    source, model, batches = _synthetic_validation(preset_model("test"), 2, 1,
                                                   "--synthetic-frames", "9")
    result = nll_per_position(model, source.layout, batches)
    per_position = np.asarray(result["per_position_nll"]).reshape(9, -1)
    assert [s["latent_frames"] for s in result["per_segment_nll"]] == [[0, 5], [4, 9]]
    for segment, (start, end) in zip(result["per_segment_nll"], [(0, 5), (4, 9)], strict=True):
        assert segment["nll"] == pytest.approx(per_position[start:end].mean(), rel=1e-6)
    five = nll_per_position(model, dataclasses.replace(source.layout, num_frames=5),
                            [b[:, :source.layout.label_span(0, 5)[1] + 1] for b in batches])
    assert five["per_segment_nll"] == []  # one clip's length: no segments

def test_eval_cli_nll_flow_and_plot_on_trained_checkpoint(tmp_path_factory, dist_world_of_one):
    from localopt_plugin.commands.evaluate import main
    from localopt_plugin.video.io import write_mp4

    ckpt, manifest = train_fsq_checkpoint(tmp_path_factory.getbasetemp() / "fsq")
    out = tmp_path_factory.mktemp("eval")
    main(["nll", "--checkpoint", str(ckpt), "--num-samples", "4", "--micro-batch-size", "2",
          "--out", str(out / "nll.json"), "--plot", str(out / "nll.png")])
    result = json.loads((out / "nll.json").read_text())
    assert result["iteration"] == 2 and result["num_samples"] == 4
    assert len(result["per_frame_nll"]) == manifest.latent_grid[0]
    assert all(np.isfinite(result["per_frame_nll"]))
    assert (out / "nll.png").read_bytes()[:4] == b"\x89PNG"
    main(["plot", str(out / "nll.json"), str(out / "nll.json"), "--labels", "a", "b",
          "--out", str(out / "compare.png")])
    assert (out / "compare.png").stat().st_size > 0
    write_mp4(out / "videos" / "v.mp4", render_video(2, seed=3, num_frames=9, size=32))
    main(["flow", str(out / "videos"), "--out", str(out / "flow.json")])
    flow = json.loads((out / "flow.json").read_text())
    assert flow["num_videos"] == 1 and len(flow["videos"][str(out / "videos" / "v.mp4")]
                                           ["per_pair"]) == 8


def test_condition_check_scores_the_same_videos_with_the_null_condition(dist_world_of_one):
    """Against an independent computation: the loss of the batches with their condition slot
    overwritten by hand with the null id, on preset "test" (RoPE, RMSNorm, SwiGLU, GQA,
    untied)."""
    from localopt_plugin import registry
    from localopt_plugin.evaluation.nll import condition_check, nll_per_position
    from localopt_plugin.model import build_gpt_model
    from localopt_plugin.objectives.sequence import FullSequence

    args = tiny_args()
    source = registry.build("dataset", "synthetic-video-tokens",
                            registry.config_from_args("dataset", "synthetic-video-tokens", args),
                            seed=args.seed)
    vocab, layout = source.vocab, source.layout
    model = build_gpt_model(preset_model(), vocab.size).eval()  # the shipped architecture
    batches = [b["tokens"] for b, _ in zip(source.valid.batches(3, 0, 1, seed=0), range(2),
                                           strict=False)]
    originals = [b.clone() for b in batches]
    true = nll_per_position(model, layout, batches)
    check = condition_check(model, vocab, layout, batches, true["mean_nll"])
    assert all(torch.equal(a, b) for a, b in zip(batches, originals, strict=True))
    nulled = [b.clone() for b in batches]
    for b in nulled:
        assert layout.video_start == 3 and (b[:, 1] != vocab.null_condition).all()
        b[:, 1] = vocab.null_condition
    with torch.no_grad():
        null_loss = np.mean([FullSequence(layout)(model, t).loss.item() for t in nulled])
    assert check["mean_nll"] == pytest.approx(null_loss, rel=1e-5)
    video_tokens = layout.num_frames * layout.frame_tokens
    assert check["condition_nats_per_video"] == pytest.approx(
        (null_loss - true["mean_nll"]) * video_tokens, rel=1e-4, abs=1e-4)
    assert check["condition_nats_per_video"] != 0  # an untrained model reads the condition too
