"""Synthetic class-conditional video tokens: no files needed, learnable, deterministic.

Each class has a random "texture" of token ids and a motion (a per-frame shift): frame f of a
sample is its class texture rolled by ``f * speed`` plus a per-sample offset, with a few noise
tokens. Predicting later frames needs the earlier ones, so losses reward real context use.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch

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
class SyntheticConfig:
    """The ``--synthetic-*`` flags."""

    frames: int = 5
    frame_tokens: int = 64
    codebook_size: int = 512
    num_classes: int = 10

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("synthetic-video-tokens dataset")
        g.add_argument("--synthetic-frames", type=int, default=5,
                       help="latent frames per sample of the synthetic dataset")
        g.add_argument("--synthetic-frame-tokens", type=int, default=64,
                       help="tokens per latent frame of the synthetic dataset")
        g.add_argument("--synthetic-codebook-size", type=int, default=512)
        g.add_argument("--synthetic-num-classes", type=int, default=10)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SyntheticConfig:
        config = cls(frames=args.synthetic_frames, frame_tokens=args.synthetic_frame_tokens,
                     codebook_size=args.synthetic_codebook_size,
                     num_classes=args.synthetic_num_classes)
        config.validate()
        return config

    def validate(self) -> None:
        for flag, value, least in (("--synthetic-frames", self.frames, 1),
                                   ("--synthetic-frame-tokens", self.frame_tokens, 1),
                                   ("--synthetic-codebook-size", self.codebook_size, 2),
                                   ("--synthetic-num-classes", self.num_classes, 0)):
            if value < least:
                raise UserError(f"{flag} must be >= {least}, got {value}")


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
