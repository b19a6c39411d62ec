"""``recall-tokens``: a token-level long-range recall task that trains in minutes on a CPU.

Why: the pixel recall benchmark (:mod:`.recall`) takes about an hour per seed; remedies for
Local Opt.'s lost recall need a task where one run takes minutes. No pixels, no tokenizer:
each latent frame is a ``grid x grid`` token grid cut into ``parts`` square blocks.

* cue frames ``[0, cue_frames)``: every block in its own colour (ids ``[0, colours)``);
* hidden frames ``[cue_frames, cue_frames + gap)``: every token the occluder id ``colours``;
* frames from ``reappear = cue_frames + gap`` on: the cue again.

Only the first token of each block in the reappearance frame (its **lead** token, raster order)
needs the cue: every other token can copy from its left or upper neighbour, later frames from
the frame before. A sample is its cue (one colour per block: ``colours ** parts`` cues); cues
are split between train, valid and test by a hash of the cue, so held-out cues are disjoint
from trained ones by construction.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from localopt_plugin.config_flags import FlagConfig, option
from localopt_plugin.data.layout import SampleLayout, Vocabulary
from localopt_plugin.data.source import MapStyleSource, VideoTokenSource
from localopt_plugin.errors import UserError
from localopt_plugin.registry import register

SPLITS = ("train", "valid", "test")
SPLIT_SHARES = (0.7, 0.15, 0.15)
LEAST_CUES = 20  # fewer possible cues cannot be split into three non-empty held-out sets


@dataclass(frozen=True)
class RecallTokensConfig(FlagConfig):
    """The ``--recall-tokens-*`` flags: the task's sizes."""

    PREFIX: ClassVar[str] = "--recall-tokens-"
    GROUP: ClassVar[str] = "recall-tokens dataset (token-level recall task)"

    frames: int = option(9, "latent frames per sample")
    grid: int = option(4, "a frame is GRID x GRID tokens")
    colours: int = option(4, "K: colours a cue block can take (chance recall is 1/K)")
    parts: int = option(4, "square blocks per frame, each in its own colour (1, 4, 9, ...)")
    cue_frames: int = option(2, "frames showing the cue before it is hidden")
    gap: int = option(5, "frames the cue stays hidden; it reappears after them")
    # cues repeat: the train split holds ~70% of them
    samples: int = option(4096, "training samples per epoch")

    def validate(self) -> None:
        for name, least in (("frames", 2), ("grid", 1), ("colours", 2), ("parts", 1),
                            ("cue_frames", 1), ("gap", 1), ("samples", 1)):
            if getattr(self, name) < least:
                raise UserError(f"{self.flag(name)} must be >= {least}, got "
                                f"{getattr(self, name)}")
        side = math.isqrt(self.parts)
        if side * side != self.parts or self.grid % side:
            raise UserError(f"--recall-tokens-parts {self.parts} must be a square whose root "
                            f"divides --recall-tokens-grid {self.grid} (e.g. 1 or 4)")
        if self.reappear >= self.frames:
            raise UserError(f"the cue reappears at frame {self.reappear} (cue frames "
                            f"{self.cue_frames} + gap {self.gap}), after the last of "
                            f"--recall-tokens-frames {self.frames}: use more frames")
        if self.colours ** self.parts < LEAST_CUES:
            raise UserError(f"{self.colours} colours x {self.parts} parts make "
                            f"{self.colours ** self.parts} cues, fewer than the {LEAST_CUES} "
                            "that train/valid/test splits need: raise --recall-tokens-colours "
                            "or --recall-tokens-parts")

    @property
    def reappear(self) -> int:
        """The first frame after the hiding."""
        return self.cue_frames + self.gap

    @property
    def occluder(self) -> int:
        return self.colours

    @property
    def frame_tokens(self) -> int:
        return self.grid * self.grid

    def layout(self) -> SampleLayout:
        return SampleLayout(video_start=3, num_frames=self.frames, frame_tokens=self.frame_tokens)

    def vocabulary(self) -> Vocabulary:
        return Vocabulary(video_vocab_size=self.colours + 1, num_classes=1)

    def block_map(self) -> np.ndarray:
        """The block (cue part) of each token of a frame, raster order ``[grid * grid]``."""
        block = self.grid // math.isqrt(self.parts)
        rows, cols = np.divmod(np.arange(self.frame_tokens), self.grid)
        return (rows // block) * math.isqrt(self.parts) + cols // block

    def lead_tokens(self) -> np.ndarray:
        """Each block's first token in raster order: the ones only the cue can predict."""
        blocks = self.block_map()
        return np.array([int(np.flatnonzero(blocks == p)[0]) for p in range(self.parts)])

    def cue(self, index: int) -> np.ndarray:
        """Cue ``index`` (of ``colours ** parts``): one colour per block."""
        return np.array([(index // self.colours ** p) % self.colours
                         for p in range(self.parts)])

    def frames_of(self, cue: np.ndarray) -> np.ndarray:
        """The latent frames ``[frames, grid * grid]`` of a cue."""
        shown = np.asarray(cue)[self.block_map()]
        frames = np.full((self.frames, self.frame_tokens), self.occluder, dtype=np.int64)
        frames[:self.cue_frames] = shown
        frames[self.reappear:] = shown
        return frames


def split_of(config: RecallTokensConfig, index: int) -> str:
    """The split of cue ``index``, by a hash of its colours (disjoint by construction)."""
    digest = hashlib.sha256(config.cue(index).astype(np.int64).tobytes()
                            + bytes([config.colours])).digest()
    share, bound = int.from_bytes(digest[:8], "little") / 2 ** 64, 0.0
    for name, part in zip(SPLITS, SPLIT_SHARES, strict=True):
        bound += part
        if share < bound:
            return name
    return SPLITS[-1]


def split_cues(config: RecallTokensConfig, split: str) -> np.ndarray:
    """Indices of the cues of ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: one of {', '.join(SPLITS)}")
    return np.array([i for i in range(config.colours ** config.parts)
                     if split_of(config, i) == split])


class RecallTokens(torch.utils.data.Dataset):
    """``num_samples`` samples of ``split``'s cues, drawn with ``seed``."""

    def __init__(self, config: RecallTokensConfig, split: str, num_samples: int,
                 seed: int) -> None:
        self.config, self.num_samples = config, num_samples
        self.cues = split_cues(config, split)
        if not len(self.cues):
            raise UserError(f"recall-tokens: no cue falls in the {split} split; raise "
                            "--recall-tokens-colours or --recall-tokens-parts")
        self.order = np.random.default_rng([seed, SPLITS.index(split)]).integers(
            len(self.cues), size=num_samples)
        self.vocab = config.vocabulary()

    def __len__(self) -> int:
        return self.num_samples

    def cue_index(self, index: int) -> int:
        return int(self.cues[self.order[index]])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        frames = self.config.frames_of(self.config.cue(self.cue_index(index)))
        tokens = np.concatenate([[self.vocab.bos, self.vocab.class_token(0), self.vocab.bov],
                                 frames.reshape(-1), [self.vocab.eov]])
        return {"tokens": torch.from_numpy(tokens.astype(np.int64)), "label": torch.tensor(0)}


@register("dataset", "recall-tokens", config=RecallTokensConfig)
def recall_tokens(config: RecallTokensConfig, *, seed: int = 1234) -> VideoTokenSource:
    return VideoTokenSource(
        vocab=config.vocabulary(), layout=config.layout(),
        train=MapStyleSource(RecallTokens(config, "train", config.samples, seed)),
        valid=MapStyleSource(RecallTokens(config, "valid", 256, seed)),
        info={"reappear": config.reappear, "lead tokens": config.lead_tokens().tolist()})
