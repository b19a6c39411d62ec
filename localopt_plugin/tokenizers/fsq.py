"""The embedded tokenizer: a tiny causal convolutional autoencoder with FSQ codes.

Why this design: it has to ship inside the package (under 1 MB of weights) and train on two CPU
cores in minutes, yet behave like the pretrained tokenizers it stands in for (Cosmos DV):
causal temporal compression ``1 + 4k -> 1 + k`` frames, spatial compression 4x, one id per
latent position from a finite scalar quantizer (no codebook to collapse, no commitment loss).

* Space/time to depth: the first frame alone, then each group of 4 frames, is cut into 4x4
  patches and stacked on channels; a 1x1 conv per path maps them to ``channels`` features.
  Almost all compute then runs at 16x16 for a 64x64 clip, which keeps CPU training cheap.
* Causal residual blocks: each 3x3 conv sees the latent frame and its predecessor, so a latent
  frame never depends on later frames (frame 0 is encoded exactly as a 1-frame clip would be).
* FSQ (Mentzer et al., 2023): ``len(levels)`` channels are bounded with tanh and rounded to
  ``levels[i]`` values (straight-through gradients); the id is their mixed-radix number.
* The decoder mirrors the encoder and predicts 4x4 patches (pixel shuffle) per path.

``fsq-video-simple`` is the same model with its codebook cut to the ids that the procedural
``simple`` variant uses (``weights/fsq_video_simple_codes.json``, made by
``tools/build_codebook.py``): a GPT over its ids needs an output layer of ~150 instead of ~5000
rows, which makes the main job's steps cheaper. A clip that needs any other id is refused.
``fsq-video-recall`` keeps the ids of every clip of the procedural recall variant (65 frames at
32x32, its default hiding; ``weights/fsq_video_recall_codes.json``); an id outside them (another
hiding, another size) is replaced by the kept id whose FSQ code is nearest, as a vector
quantizer would, instead of refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from localopt_plugin.errors import UserError
from localopt_plugin.registry import register
from localopt_plugin.tokenizers.base import VideoTokenizer, frames_to_tensor, tensor_to_frames

DEFAULT_CONFIG: dict[str, Any] = {
    "levels": [8, 5, 5, 5, 5],
    "channels": 32,
    "blocks": 2,
    "temporal_compression": 4,
    "spatial_compression": 4,
}
WEIGHTS_NAME = "fsq_video.pt"
SIMPLE_CODES_NAME = "fsq_video_simple_codes.json"
RECALL_CODES_NAME = "fsq_video_recall_codes.json"


def shipped_path(name: str) -> Path:
    """A file shipped in the package data ``localopt_plugin/tokenizers/weights/``."""
    return Path(str(files("localopt_plugin.tokenizers") / "weights" / name))


def default_weights_path() -> Path:
    """The shipped weights."""
    return shipped_path(WEIGHTS_NAME)


class FSQ(nn.Module):
    """Finite scalar quantization: ``[..., d]`` real -> codes in [-1, 1] and integer ids."""

    def __init__(self, levels: list[int]) -> None:
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32),
                             persistent=False)
        basis = np.cumprod([1, *levels[:-1]])
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.int64), persistent=False)
        self.vocab_size = int(np.prod(levels))

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        # Even level counts need a half-step offset so that rounding gives exactly L values.
        half = (self.levels - 1) * (1 - 1e-3) / 2
        offset = (self.levels % 2 == 0).float() * 0.5
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bounded = self._bound(z)
        rounded = bounded + (bounded.round() - bounded).detach()  # straight-through
        half_width = (self.levels // 2)
        digits = (rounded.detach() + half_width).long()
        ids = (digits * self.basis).sum(-1)
        return rounded / half_width, ids

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        half_width = (self.levels // 2)
        digits = (ids.unsqueeze(-1) // self.basis) % self.levels.long()
        return (digits.float() - half_width) / half_width


class CausalBlock(nn.Module):
    """Residual block over latent frames ``[B, F, C, h, w]``; frame f sees frames f and f-1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        h = torch.cat([x, prev], dim=2).flatten(0, 1)
        h = self.conv2(F.silu(self.conv1(F.silu(h))))
        return x + h.view_as(x)


class FSQVideoAutoencoder(nn.Module):
    """Frames ``[B, 3, T, H, W]`` in [-1, 1] <-> ids ``[B, F, h, w]`` (see the module doc)."""

    def __init__(self, levels: list[int], channels: int, blocks: int,
                 temporal_compression: int, spatial_compression: int) -> None:
        super().__init__()
        self.ct, self.cs = temporal_compression, spatial_compression
        patch = 3 * self.cs**2
        c = channels
        self.enc_first = nn.Conv2d(patch, c, 1)
        self.enc_rest = nn.Conv2d(patch * self.ct, c, 1)
        self.enc_blocks = nn.Sequential(*[CausalBlock(c) for _ in range(blocks)])
        self.enc_out = nn.Conv2d(c, len(levels), 1)
        self.fsq = FSQ(levels)
        self.dec_in = nn.Conv2d(len(levels), c, 3, padding=1)
        self.dec_blocks = nn.Sequential(*[CausalBlock(c) for _ in range(blocks)])
        self.dec_first = nn.Conv2d(c, patch, 3, padding=1)
        self.dec_rest = nn.Conv2d(c, patch * self.ct, 3, padding=1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (codes ``[B, F, d, h, w]`` with straight-through gradients, ids ``[B, F, h, w]``)."""
        b, _, t, hh, ww = x.shape
        k = (t - 1) // self.ct
        first = self.enc_first(F.pixel_unshuffle(x[:, :, 0], self.cs)).unsqueeze(1)
        feats = [first]
        if k:
            rest = x[:, :, 1:].reshape(b, 3, k, self.ct, hh, ww).permute(0, 2, 1, 3, 4, 5)
            rest = F.pixel_unshuffle(rest.reshape(b * k, 3 * self.ct, hh, ww), self.cs)
            feats.append(self.enc_rest(rest).view(b, k, -1, hh // self.cs, ww // self.cs))
        h = self.enc_blocks(torch.cat(feats, dim=1))
        z = self.enc_out(F.silu(h).flatten(0, 1))
        z = z.view(b, k + 1, -1, *z.shape[-2:]).permute(0, 1, 3, 4, 2)
        codes, ids = self.fsq(z)
        return codes.permute(0, 1, 4, 2, 3), ids

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, F, d, h, w]`` -> frames ``[B, 3, 1 + ct*(F-1), H, W]``."""
        b, f = codes.shape[:2]
        h = self.dec_in(codes.flatten(0, 1))
        h = F.silu(self.dec_blocks(h.view(b, f, *h.shape[1:])))
        first = F.pixel_shuffle(self.dec_first(h[:, 0]), self.cs).unsqueeze(2)
        if f == 1:
            return first
        rest = F.pixel_shuffle(self.dec_rest(h[:, 1:].flatten(0, 1)), self.cs)
        hh, ww = rest.shape[-2:]
        rest = rest.view(b, f - 1, 3, self.ct, hh, ww).permute(0, 2, 1, 3, 4, 5)
        return torch.cat([first, rest.reshape(b, 3, (f - 1) * self.ct, hh, ww)], dim=2)

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decode_codes(self.fsq.ids_to_codes(ids).permute(0, 1, 4, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, _ = self.encode(x)
        return self.decode_codes(codes)


def build_model(config: dict[str, Any]) -> FSQVideoAutoencoder:
    return FSQVideoAutoencoder(**{key: config[key] for key in DEFAULT_CONFIG})


@dataclass(frozen=True)
class FSQConfig:
    """``path``: a weights file (default: the one shipped with the package)."""

    path: str | None = None


def _short_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class FSQVideoTokenizer(VideoTokenizer):
    """The embedded tokenizer; ``weights`` defaults to the file shipped with the package.

    ``codes`` (a JSON file with a ``codes`` list): keep only these FSQ ids, renumbered
    ``0..len-1`` in ascending order; encoding a clip that needs another id raises UserError,
    or with ``nearest`` takes the kept id of the nearest FSQ code.
    """

    def __init__(self, weights: str | Path | None = None, codes: str | Path | None = None,
                 name: str = "fsq-video", nearest: bool = False) -> None:
        path = Path(weights) if weights is not None else default_weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"fsq-video weights not found: {path} (train them with "
                                    "tools/train_tokenizer.py)")
        blob = path.read_bytes()
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        self.config = dict(checkpoint["config"])
        self.model = build_model(self.config)
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.eval()
        self.name = name
        self._fingerprint = "fsq-video-" + _short_digest(blob)
        self.codes: np.ndarray | None = None  # kept FSQ ids, ascending; None: all
        if codes is not None:
            text = Path(codes).read_bytes()
            record = json.loads(text)
            if record.get("tokenizer") != self._fingerprint:  # ids depend on the weights
                raise UserError(f"{codes} lists the ids of weights {record.get('tokenizer')}, "
                                f"not of {path} ({self._fingerprint}); rebuild it with "
                                f"tools/build_codebook.py")
            self.codes = np.asarray(record["codes"], dtype=np.int64)
            full = self.model.fsq.vocab_size
            if (self.codes.ndim != 1 or not self.codes.size or np.any(np.diff(self.codes) <= 0)
                    or self.codes[0] < 0 or self.codes[-1] >= full):
                raise ValueError(f"{codes}: codes must be ascending distinct ids in [0, {full})")
            self._compact = np.full(full, -1, dtype=np.int64)
            self._compact[self.codes] = np.arange(self.codes.size)
            if nearest:
                fsq = self.model.fsq
                distances = torch.cdist(fsq.ids_to_codes(torch.arange(full)),
                                        fsq.ids_to_codes(torch.from_numpy(self.codes)))
                outside = self._compact < 0
                self._compact[outside] = distances.argmin(1).numpy()[outside]
            self._fingerprint = f"{name}-" + _short_digest(blob + text)

    @property
    def vocab_size(self) -> int:
        return self.model.fsq.vocab_size if self.codes is None else self.codes.size

    @property
    def temporal_compression(self) -> int:
        return self.config["temporal_compression"]

    @property
    def spatial_compression(self) -> int:
        return self.config["spatial_compression"]

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> np.ndarray:
        _, ids = self.model.encode(frames_to_tensor(self._check_frames(frames)))
        ids = ids[0].numpy()
        if self.codes is None:
            return ids
        compact = self._compact[ids]
        if np.any(compact < 0):
            raise UserError(
                f"tokenizer {self.name}: {int(np.sum(compact < 0))} of {ids.size} tokens of this "
                f"clip fall outside its {self.codes.size}-id codebook (made for one procedural "
                f"variant); tokenize other videos with fsq-video")
        return compact

    @torch.no_grad()
    def decode(self, ids: np.ndarray) -> np.ndarray:
        ids = self._check_ids(ids)
        if self.codes is not None:
            ids = self.codes[ids]
        return tensor_to_frames(self.model.decode_ids(torch.from_numpy(ids).unsqueeze(0)))


@register("tokenizer", "fsq-video", config=FSQConfig)
def build_fsq_video(config: FSQConfig | None = None) -> FSQVideoTokenizer:
    return FSQVideoTokenizer((config or FSQConfig()).path)


@register("tokenizer", "fsq-video-simple", config=FSQConfig)
def build_fsq_video_simple(config: FSQConfig | None = None) -> FSQVideoTokenizer:
    return FSQVideoTokenizer((config or FSQConfig()).path, shipped_path(SIMPLE_CODES_NAME),
                             name="fsq-video-simple")


@register("tokenizer", "fsq-video-recall", config=FSQConfig)
def build_fsq_video_recall(config: FSQConfig | None = None) -> FSQVideoTokenizer:
    return FSQVideoTokenizer((config or FSQConfig()).path, shipped_path(RECALL_CODES_NAME),
                             name="fsq-video-recall", nearest=True)
