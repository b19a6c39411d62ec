"""The recall variant of the procedural videos: long clips whose last part depends on the first.

Why: in the other variants every frame follows from the one before (static ground, fixed colour,
deterministic motion), so a model that sees a few frames sees all there is to see, and a
benchmark on them cannot tell whether training on windows of frames loses long-range
consistency. Here the object's colour, drawn from a palette of ``colours`` and not part of the
class label, shows only before ``hide_start``; the object is then hidden for ``hide_frames``
frames (longer than a training window) and reappears where its motion puts it, in that colour.
A model that recalls draws it in the first segment's colour; one that does not guesses
(chance ``1 / colours``).

The scene is the ``simple`` variant's: one shape on a flat ground moving along its class's
trajectory; the seed also picks the side, the speed and a phase (``PHASES`` frames into the
trajectory), so a clip is the tuple ``(class, side, speed, phase, colour)``. Each clip belongs
to one split by a hash of its pixels (``SPLIT_SHARES``; tuples that draw the same pixels, e.g.
a bounce from either side at matching phases, share it): the training, validation and reference
clips (the Frechet distance's real clips) are disjoint by content, whatever the seeds; a seed
of a split draws tuples until one falls in that split.

A clip's setting is written in its source as ``procedural-recall:N:SEED[:OPTIONS]`` with
``OPTIONS`` ``split=train|valid|reference,colours=K,hide=START+FRAMES`` (defaults: train, 4,
17+32: 65-frame clips show the object in frames 0-16, the first 17-frame segment, and again
from frame 49, the last segment).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from localopt_plugin.data.procedural import (
    MOTIONS,
    PLAIN_GROUND,
    shape_distance,
    simple_trajectory,
    split_class,
)
from localopt_plugin.errors import UserError

# Colours the embedded tokenizer keeps apart (each far from the ground and from the others).
PALETTE = np.array([(0.95, 0.85, 0.20), (0.20, 0.85, 0.95), (0.95, 0.30, 0.25),
                    (0.35, 0.95, 0.35), (0.98, 0.98, 0.98), (0.95, 0.45, 0.90)])
PHASES = 16
SPLITS = ("train", "valid", "reference")
SPLIT_SHARES = (0.7, 0.15, 0.15)


@dataclass(frozen=True)
class RecallSetting:
    """What a recall clip hides and for how long; ``split`` is the set its clips come from."""

    split: str = "train"
    colours: int = 4
    hide_start: int = 17
    hide_frames: int = 32

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise UserError(f"recall split must be one of {', '.join(SPLITS)}, got "
                            f"{self.split!r}")
        if not 2 <= self.colours <= len(PALETTE):
            raise UserError(f"recall colours must lie in [2, {len(PALETTE)}], got "
                            f"{self.colours}")
        if self.hide_start < 1 or self.hide_frames < 1:
            raise UserError(f"recall hide=START+FRAMES needs START >= 1 and FRAMES >= 1, got "
                            f"{self.hide_start}+{self.hide_frames}")

    @property
    def hide_end(self) -> int:
        """The first frame the object shows again."""
        return self.hide_start + self.hide_frames

    def options(self) -> str:
        """The setting as a source's OPTIONS field (its defaults included: sources are
        explicit)."""
        return (f"split={self.split},colours={self.colours},"
                f"hide={self.hide_start}+{self.hide_frames}")

    @classmethod
    def parse(cls, options: str) -> RecallSetting:
        """The setting of an OPTIONS field (``key=value`` pairs joined by commas)."""
        values: dict[str, object] = {}
        for item in filter(None, options.split(",")):
            key, _, value = item.partition("=")
            if key not in ("split", "colours", "hide"):
                raise UserError(f"unknown recall option {key!r} in {options!r}; options: "
                                "split=train|valid|reference, colours=K, hide=START+FRAMES")
            try:
                if key == "split":
                    values["split"] = value
                elif key == "colours":
                    values["colours"] = int(value)
                else:
                    start, _, frames = value.partition("+")
                    values["hide_start"], values["hide_frames"] = int(start), int(frames)
            except ValueError:
                raise UserError(f"bad recall option {item!r} in {options!r}") from None
        return cls(**values)


@dataclass(frozen=True)
class RecallClip:
    """The tuple that makes a clip."""

    class_id: int
    side: float
    speed_pixels: float  # pixels per frame at 64x64
    phase: int
    colour: int


def split_of(frames: np.ndarray) -> str:
    """The split a clip's pixels belong to (a hash of them: the same on every machine)."""
    share = int.from_bytes(hashlib.sha256(frames.tobytes()).digest()[:8], "big") / 2**64
    return SPLITS[int(np.searchsorted(np.cumsum(SPLIT_SHARES), share, side="right"))]


def recall_clip(class_id: int, seed: int, setting: RecallSetting, num_frames: int = 65,
                size: int = 32) -> tuple[RecallClip, np.ndarray]:
    """The tuple ``seed`` draws for ``class_id`` in ``setting.split`` and its pixels
    (deterministic)."""
    split_class(class_id)  # validates
    rng = np.random.default_rng([int(seed), int(class_id), 7])
    for _ in range(10_000):
        clip = RecallClip(class_id, float(rng.choice([-1.0, 1.0])), float(rng.choice([2.0, 3.0])),
                          int(rng.integers(PHASES)), int(rng.integers(setting.colours)))
        frames = render_recall_clip(clip, num_frames, size, setting)
        if split_of(frames) == setting.split:
            return clip, frames
    raise RuntimeError(f"no {setting.split} clip of class {class_id} found")


def render_recall_clip(clip: RecallClip, num_frames: int, size: int,
                       setting: RecallSetting) -> np.ndarray:
    """The pixels of ``clip``: uint8 ``[num_frames, size, size, 3]``."""
    if num_frames < 1 or size < 4:
        raise ValueError(f"need num_frames >= 1 and size >= 4, got {num_frames}, {size}")
    shape, motion = split_class(clip.class_id)
    t = np.arange(num_frames, dtype=np.float64) + clip.phase
    cx, cy, radius = simple_trajectory(MOTIONS[motion], clip.side, clip.speed_pixels, t)
    grid = (np.arange(size, dtype=np.float64) + 0.5) / size
    v, u = np.meshgrid(grid, grid, indexing="ij")
    dx = (u[None] - cx[:, None, None]) * size
    dy = (v[None] - cy[:, None, None]) * size
    alpha = np.clip(0.5 - shape_distance(shape, dx, dy, radius[:, None, None] * size, 0.0), 0, 1)
    alpha[setting.hide_start:setting.hide_end] = 0.0
    ground = np.asarray(PLAIN_GROUND)
    frames = ground * (1 - alpha[..., None]) + PALETTE[clip.colour] * alpha[..., None]
    return np.round(frames * 255).astype(np.uint8)


def render_recall_video(class_id: int, seed: int, num_frames: int, size: int = 32,
                        setting: RecallSetting | None = None) -> np.ndarray:
    """The recall clip of ``class_id`` drawn with ``seed`` in ``setting``'s split."""
    return recall_clip(class_id, seed, setting or RecallSetting(), num_frames, size)[1]
