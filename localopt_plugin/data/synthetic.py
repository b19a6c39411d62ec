"""Synthetic class-conditional video tokens: no files needed, learnable, deterministic.

Each class has a random "texture" of token ids and a motion (a per-frame shift): frame f of a
sample is its class texture rolled by ``f * speed`` plus a per-sample offset, with a few noise
tokens. Predicting later frames needs the earlier ones, so losses reward real context use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from localopt_plugin.config_flags import FlagConfig, option
from localopt_plugin.data.layout import SampleLayout, Vocabulary
from localopt_plugin.data.source import MapStyleSource, VideoTokenSource
from localopt_plugin.errors import UserError
from localopt_plugin.registry import register


class SyntheticVideoTokens(torch.utils.data.Dataset):
    def __init__(self, layout: SampleLayout, vocab: Vocabulary, num_samples: int, split: int,
                 seed: int, noise: float = 0.05) -> None:
        self.layout, self.vocab, self.num_samples = layout, vocab, num_samples
        self.split, self.seed, self.noise = split, seed, noise
        rng = np.random.default_rng(seed)  # the class textures and motions: shared by splits
        self.textures = rng.integers(0, vocab.video_vocab_size,
                                     size=(vocab.num_classes, layout.frame_tokens))
        self.speeds = rng.integers(1, 4, size=vocab.num_classes)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.split, index])
        label = int(rng.integers(self.vocab.num_classes))
        offset = int(rng.integers(self.layout.frame_tokens))
        frames = np.stack([
            np.roll(self.textures[label], offset + f * int(self.speeds[label]))
            for f in range(self.layout.num_frames)
        ])
        noisy = rng.random(frames.shape) < self.noise
        frames[noisy] = rng.integers(0, self.vocab.video_vocab_size, size=int(noisy.sum()))
        tokens = np.concatenate([
            [self.vocab.bos, self.vocab.class_token(label), self.vocab.bov],
            frames.reshape(-1),
            [self.vocab.eov],
        ])
        return {"tokens": torch.from_numpy(tokens.astype(np.int64)),
                "label": torch.tensor(label)}


@dataclass(frozen=True)
class SyntheticConfig(FlagConfig):
    """The ``--synthetic-*`` flags."""

    PREFIX: ClassVar[str] = "--synthetic-"
    GROUP: ClassVar[str] = "synthetic-video-tokens dataset"

    frames: int = option(5, "latent frames per sample of the synthetic dataset")
    frame_tokens: int = option(64, "tokens per latent frame of the synthetic dataset")
    codebook_size: int = option(512, "video token ids of the synthetic dataset")
    num_classes: int = option(10, "class labels of the synthetic dataset")

    def validate(self) -> None:
        for name, least in (("frames", 1), ("frame_tokens", 1), ("codebook_size", 2),
                            ("num_classes", 0)):
            if getattr(self, name) < least:
                raise UserError(f"{self.flag(name)} must be >= {least}, got "
                                f"{getattr(self, name)}")


@register("dataset", "synthetic-video-tokens", config=SyntheticConfig)
def synthetic_video_tokens(config: SyntheticConfig, *, seed: int = 1234) -> VideoTokenSource:
    vocab = Vocabulary(video_vocab_size=config.codebook_size, num_classes=config.num_classes)
    layout = SampleLayout(video_start=3, num_frames=config.frames,
                          frame_tokens=config.frame_tokens)
    return VideoTokenSource(
        vocab=vocab,
        layout=layout,
        train=MapStyleSource(SyntheticVideoTokens(layout, vocab, 4096, split=0, seed=seed)),
        valid=MapStyleSource(SyntheticVideoTokens(layout, vocab, 256, split=1, seed=seed)),
    )
