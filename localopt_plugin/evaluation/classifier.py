"""An evaluator for the embedded data: a small video classifier of the 12 procedural classes.

Why: no pretrained video network (I3D for FVD) can be downloaded here, yet the paper's claims
are about the quality of generated videos. On the embedded data the classes are known, so a
classifier trained on real procedural clips measures what matters: does a generated video show
the conditioned shape and motion (accuracy, also per shape and per motion, and on the first
and last frames separately: error accumulation), and how far is the distribution of generated
videos from real ones (the Frechet distance of the classifier's penultimate features, an
FVD-style score).

The network (:class:`VideoClassifier`): a shape branch (2-D convolutions over single frames)
and a motion branch (3-D convolutions over the frames and their differences) whose logits add,
pooled over space and time, so any clip of at least 5 frames goes in (resized to 64x64;
shorter parts of a video included). It is trained by
``tools/train_classifier.py`` on procedural clips with seeds from ``TRAIN_SEED_START`` (above
every range used elsewhere: the main job's and tests' splits are below 10^6, the tokenizer's
training seeds below 2^31), half of them passed through the embedded tokenizer (generated videos
are decoded by it, so its blur must not look like another class), on random temporal crops
(9 to 17 frames).
Held-out clips use seeds from ``HELDOUT_SEED_START``. The weights ship with the package.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from localopt_plugin.data.procedural import (
    BACKGROUNDS,
    MOTIONS,
    NUM_CLASSES,
    SHAPES,
    render_video,
)
from localopt_plugin.evaluation.fvd import feature_stats, frechet_distance
from localopt_plugin.evaluation.segments import segments

TRAIN_SEED_START = 2**31
HELDOUT_SEED_START = 2**31 + 10**7  # the classifier's held-out accuracy
REFERENCE_SEED_START = 2**31 + 2 * 10**7  # the real clips generated videos are compared to
CONTROL_SEED_START = 2**31 + 3 * 10**7  # real clips scored like generated ones (the floor)
SIZE = 64  # frames are resized to SIZE x SIZE
MIN_FRAMES = 5
SHAPE_FRAMES = 2  # frames per clip the shape branch sees in training (all at evaluation)
TRAIN_MIN_FRAMES = 9  # training crops: 9 to 17 frames (the evaluated parts: first/last 9, all)
FEATURES = 128
# The training mix: textured, the hardest variant, takes half of the clips.
TRAINING_BACKGROUNDS = ("textured", "textured", "calm", "plain")
WEIGHTS = "weights/video_classifier.pt"


class VideoClassifier(nn.Module):
    """Uint8-range video ``[B, 3, T, 64, 64]`` -> 12 class logits (and 128 features).

    Two branches whose logits add, ``logit[shape, motion] = a[shape] + b[motion]`` (class =
    shape x 4 + motion), so the 12-way softmax factorizes into p(shape) p(motion):

    * shape: a 2-D CNN over single frames at full resolution (frames as a batch; in training a
      few random frames per clip), mean and max pooled, averaged over the frames;
    * motion: a 3-D CNN over the frames and their temporal differences.

    Batch norm, mean + max pooling. Measured on the way here: one 3-D network with a 12-way head
    learned the motions but confused circles and squares (76% held out after 3000 steps); with
    group norm or mean pooling alone it stayed at chance for hundreds of steps.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        shape_channels = (3, width, 2 * width, 4 * width, 4 * width)
        self.shape_convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, 1 if i == 0 else 2, padding=1)
            for i, (c_in, c_out) in enumerate(zip(shape_channels[:-1], shape_channels[1:],
                                                  strict=True)))
        self.shape_norms = nn.ModuleList(nn.BatchNorm2d(c) for c in shape_channels[1:])
        motion_channels = (6, width, 2 * width, 4 * width, 6 * width)
        kernels = ((1, 5, 5), (3, 3, 3), (3, 3, 3), (3, 3, 3))
        strides = ((1, 2, 2), (1, 2, 2), (2, 2, 2), (1, 2, 2))
        self.motion_convs = nn.ModuleList(
            nn.Conv3d(c_in, c_out, k, s, padding=tuple(x // 2 for x in k))
            for c_in, c_out, k, s in zip(motion_channels[:-1], motion_channels[1:], kernels,
                                         strides, strict=True))
        self.motion_norms = nn.ModuleList(nn.BatchNorm3d(c) for c in motion_channels[1:])
        self.shape_features = nn.Linear(2 * shape_channels[-1], FEATURES // 2)
        self.motion_features = nn.Linear(2 * motion_channels[-1], FEATURES // 2)
        self.shape_head = nn.Linear(FEATURES // 2, len(SHAPES))
        self.motion_head = nn.Linear(FEATURES // 2, len(MOTIONS))

    def _branches(self, x: torch.Tensor,
                  frames: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x / 127.5 - 1.0
        picked = x if frames is None else x[:, :, frames]
        b, c, t, h, w = picked.shape
        images = picked.transpose(1, 2).reshape(b * t, c, h, w)
        for conv, norm in zip(self.shape_convs, self.shape_norms, strict=True):
            images = F.gelu(norm(conv(images)))
        pooled = torch.cat([images.mean(dim=(2, 3)), images.amax(dim=(2, 3))], 1)
        shape = F.gelu(self.shape_features(pooled.reshape(b, t, -1).mean(1)))
        motion = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:] - x[:, :, :-1]], 2)
        video = torch.cat([x, motion], 1)
        for conv, norm in zip(self.motion_convs, self.motion_norms, strict=True):
            video = F.gelu(norm(conv(video)))
        pooled = torch.cat([video.mean(dim=(2, 3, 4)), video.amax(dim=(2, 3, 4))], 1)
        return shape, F.gelu(self.motion_features(pooled))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, 128]`` of float videos ``[B, 3, T, H, W]`` in [0, 255]."""
        return torch.cat(self._branches(x, None), 1)

    def forward(self, x: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits ``[B, 12]``; ``frames``: the frame indices the shape branch looks at
        (default: all)."""
        shape, motion = self._branches(x, frames)
        logits = self.shape_head(shape)[:, :, None] + self.motion_head(motion)[:, None, :]
        return logits.flatten(1)


def to_input(videos: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, T, H, W, 3]`` -> float ``[N, 3, T, 64, 64]`` (resized when needed)."""
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be uint8 [N, T, H, W, 3], got shape {videos.shape}")
    if videos.shape[1] < MIN_FRAMES:
        raise ValueError(f"the classifier needs at least {MIN_FRAMES} frames, got "
                         f"{videos.shape[1]}")
    x = torch.from_numpy(np.ascontiguousarray(videos)).float().permute(0, 4, 1, 2, 3)
    if x.shape[-2:] != (SIZE, SIZE):
        n, c, t = x.shape[:3]
        x = F.interpolate(x.reshape(n, c * t, *x.shape[-2:]), size=(SIZE, SIZE),
                          mode="bilinear", align_corners=False).reshape(n, c, t, SIZE, SIZE)
    return x


def default_weights_path() -> Path:
    return Path(str(files("localopt_plugin.evaluation").joinpath(WEIGHTS)))


@functools.cache
def load_classifier(path: str | None = None) -> VideoClassifier:
    """The shipped classifier (or the weights file ``path``), in eval mode."""
    path = Path(path) if path else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"video classifier weights not found: {path} (train them with "
                                f"tools/train_classifier.py)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = VideoClassifier(**checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


@torch.no_grad()
def _run(videos: np.ndarray, what: str, batch_size: int = 32,
         weights: str | None = None) -> np.ndarray:
    model = load_classifier(weights)
    outputs = []
    for start in range(0, len(videos), batch_size):
        x = to_input(videos[start:start + batch_size])
        outputs.append(model.features(x) if what == "features" else model(x))
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, FEATURES))


def classify_videos(videos: np.ndarray, weights: str | None = None) -> np.ndarray:
    """Class ids ``[N]`` of uint8 videos ``[N, T, H, W, 3]`` (class = shape x 4 + motion)."""
    return _run(videos, "logits", weights=weights).argmax(-1)


def video_features(videos: np.ndarray, weights: str | None = None) -> np.ndarray:
    """The classifier's penultimate features ``[N, 128]`` (for Frechet distances)."""
    return _run(videos, "features", weights=weights)


def class_accuracy(videos: np.ndarray, labels: np.ndarray, part_frames: int | None = 9,
                   weights: str | None = None) -> dict[str, float]:
    """Accuracy against the conditioning labels: the class, its shape and its motion, on the
    whole videos and (``part_frames``) on their first and last ``part_frames`` frames (error
    accumulation shows as a lower accuracy at the end)."""
    labels = np.asarray(labels)
    result = {}
    parts = {"": videos}
    if part_frames and videos.shape[1] > part_frames:
        parts.update({"first frames ": videos[:, :part_frames],
                      "last frames ": videos[:, -part_frames:]})
    for part, clips in parts.items():
        predicted = classify_videos(clips, weights)
        motions = len(MOTIONS)
        result[f"{part}accuracy"] = float((predicted == labels).mean())
        result[f"{part}shape accuracy"] = float(
            (predicted // motions == labels // motions).mean())
        result[f"{part}motion accuracy"] = float(
            (predicted % motions == labels % motions).mean())
    return result


def segment_report(videos: np.ndarray, labels: np.ndarray, reference: np.ndarray,
                   control: np.ndarray, weights: str | None = None) -> list[dict[str, Any]]:
    """Per 17-frame segment of long videos: class, shape and motion accuracy and the Frechet
    distance to the same segment of the ``reference`` real clips, beside that of as many
    ``control`` real clips (the floor); drift from the first segment to the last is error
    accumulation over time."""
    report = []
    for start, end in segments(videos.shape[1]):
        real = video_features(reference[:, start:end], weights)
        report.append({
            "frames": [start, end],
            **class_accuracy(videos[:, start:end], labels, part_frames=None, weights=weights),
            "frechet distance": feature_distance(
                video_features(videos[:, start:end], weights), real),
            "frechet distance of real clips": feature_distance(
                video_features(control[:, start:end], weights), real),
        })
    return report


def feature_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The Frechet distance of two feature sets (FVD's statistics and formula)."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


def procedural_clips(count: int, seed_start: int, num_frames: int = 17, size: int = SIZE,
                     background: str = "textured") -> tuple[np.ndarray, np.ndarray]:
    """``count`` real clips (clip ``i``: class ``i % 12``, seed ``seed_start + i``) and labels."""
    labels = np.arange(count) % NUM_CLASSES
    clips = np.stack([render_video(int(c), seed_start + i, num_frames, size,
                                   background=background)
                      for i, c in enumerate(labels)])
    return clips, labels


def train_classifier(output: Path, steps: int = 3600, seed: int = 0, batch_size: int = 24,
                     clips: int = 5760, lr: float = 2e-3, threads: int = 2,
                     command: str = "") -> dict[str, Any]:
    """Train from scratch and write ``output`` (``.pt``) and its ``.json`` record.

    The training set: ``clips`` procedural clips (17 frames at 64x64) with seeds from
    ``TRAIN_SEED_START``, every background (``TRAINING_BACKGROUNDS``), half of them passed
    through the embedded tokenizer;
    each step takes random clips and random temporal crops of 9 to 17 frames.
    """
    from localopt_plugin.tokenizers import build_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    tokenizer = build_tokenizer("fsq-video")
    data, labels = [], []
    print(f"rendering {clips} training clips (half through the tokenizer)", flush=True)
    for i in range(clips):
        label, round_ = i % NUM_CLASSES, i // NUM_CLASSES
        background = TRAINING_BACKGROUNDS[round_ // 2 % len(TRAINING_BACKGROUNDS)]
        clip = render_video(label, TRAIN_SEED_START + i, 17, SIZE, background=background)
        if round_ % 2:  # whole rounds of classes: every class and background both ways
            clip = tokenizer.decode(tokenizer.encode(clip))
        data.append(clip)
        labels.append(label)
    data, labels = np.stack(data), torch.tensor(labels)
    model = VideoClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s
                                                                              / steps)))
    losses = []
    for _ in range(steps):
        index = rng.integers(len(data), size=batch_size)
        length = int(rng.integers(TRAIN_MIN_FRAMES, 18))
        first = int(rng.integers(0, 18 - length))
        x = to_input(data[index, first:first + length])
        if rng.random() < 0.5:
            x = x.flip(-1)  # a mirrored video keeps its class (shapes and motions are symmetric)
        frames = torch.randperm(length)[:SHAPE_FRAMES]  # the shape branch's frames
        loss = F.cross_entropy(model(x, frames), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if len(losses) % 100 == 0:
            print(f"classifier step {len(losses)}/{steps}: loss {np.mean(losses[-100:]):.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    record = {
        "config": {"width": 16}, "steps": steps, "seed": seed, "batch_size": batch_size,
        "training clips": clips, "train seed start": TRAIN_SEED_START, "lr": lr,
        "threads": threads, "final loss": float(np.mean(losses[-50:])),
        "train seconds": round(time.perf_counter() - started, 1), "command": command,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": record["config"], "state_dict": model.state_dict()}, output)
    record["sha256"] = hashlib.sha256(output.read_bytes()).hexdigest()[:16]
    load_classifier.cache_clear()
    record["held-out"] = heldout_report(str(output))
    output.with_suffix(".json").write_text(json.dumps(record, indent=2))
    return record


def heldout_report(weights: str | None = None, count: int = 600) -> dict[str, float]:
    """Accuracy on held-out real clips of every background, crisp and through the tokenizer."""
    from localopt_plugin.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("fsq-video")
    report = {}
    for background in BACKGROUNDS:
        clips, labels = procedural_clips(count, HELDOUT_SEED_START, background=background)
        report[f"{background} accuracy"] = float(
            (classify_videos(clips, weights) == labels).mean())
        decoded = np.stack([tokenizer.decode(tokenizer.encode(c)) for c in clips[: count // 3]])
        report[f"{background} through the tokenizer accuracy"] = float(
            (classify_videos(decoded, weights) == labels[: count // 3]).mean())
    return report


def class_report(videos: np.ndarray, labels: np.ndarray, background: str = "textured",
                 real_count: int = 256, tokenizer: str | None = None,
                 weights: str | None = None) -> dict[str, Any]:
    """Class accuracy of ``videos`` against their conditioning ``labels`` and the Frechet
    distance of their features to ``real_count`` held-out real clips of ``background``.

    Beside it, the same distance for as many real clips of another held-out set (what a
    perfect generator would score with this many videos: the distance is biased upwards at
    small counts) and, with ``tokenizer``, for those real clips after its encode/decode (what a
    perfect model of the tokens would score).
    """
    videos, labels = np.asarray(videos), np.asarray(labels)
    if len(videos) != len(labels) or len(videos) < 2:
        raise ValueError(f"need >= 2 videos with one label each, got {len(videos)} videos and "
                         f"{len(labels)} labels")
    frames, size = videos.shape[1], videos.shape[2]
    reference, _ = procedural_clips(real_count, REFERENCE_SEED_START, frames, size, background)
    control, control_labels = procedural_clips(len(videos), CONTROL_SEED_START, frames, size,
                                               background)
    reference_features = video_features(reference, weights)
    report: dict[str, Any] = {
        "num videos": len(videos), "frames": frames, "background": background,
        "num real reference clips": real_count,
        **class_accuracy(videos, labels, weights=weights),
        "frechet distance": feature_distance(video_features(videos, weights),
                                             reference_features),
        "frechet distance of real clips": feature_distance(video_features(control, weights),
                                                           reference_features),
        "real clips accuracy": float((classify_videos(control, weights)
                                      == control_labels).mean()),
    }
    if tokenizer:
        from localopt_plugin.tokenizers import build_tokenizer

        codec = build_tokenizer(tokenizer)
        decoded = np.stack([codec.decode(codec.encode(clip)) for clip in control])
        report[f"frechet distance of real clips through {tokenizer}"] = feature_distance(
            video_features(decoded, weights), reference_features)
        report[f"real clips through {tokenizer} accuracy"] = float(
            (classify_videos(decoded, weights) == control_labels).mean())
    if segments(frames):
        report["segments"] = segment_report(videos, labels, reference, control, weights)
    return report


def reference_in_training(training: set[str], tokenizer: str, background: str,
                          real_count: int = 256, frames: int = 17,
                          size: int = SIZE) -> tuple[int, int]:
    """How many of :func:`class_report`'s ``real_count`` reference clips are training clips:
    the same tokens (by the training data's ``tokenizer``) and class as one of the samples whose
    digests are ``training`` (``localopt_plugin.data.wds.samples.sample_digests``)."""
    from localopt_plugin.data.wds.samples import token_digest
    from localopt_plugin.tokenizers import build_tokenizer

    codec = build_tokenizer(tokenizer)
    clips, labels = procedural_clips(real_count, REFERENCE_SEED_START, frames, size, background)
    shared = sum(token_digest(codec.encode(clip), int(label)) in training
                 for clip, label in zip(clips, labels, strict=True))
    return shared, real_count
