"""Adapter for pretrained discrete video tokenizers saved as TorchScript (Cosmos DV layout).

Why: NVIDIA's Cosmos discrete tokenizers (e.g. ``Cosmos-Tokenizer-DV4x8x8``) ship as a folder
with ``encoder.jit`` and ``decoder.jit``; loading them needs only ``torch.jit.load``, not their
code. The contract used here is Cosmos':

* ``encoder(x)`` with ``x`` float ``[B, 3, T, H, W]`` in [-1, 1] returns the ids ``[B, F, h, w]``
  or a tuple whose first item is the ids (Cosmos returns ``(indices, codes)``);
* ``decoder(ids)`` returns frames ``[B, 3, T, H, W]`` in [-1, 1].

The compression factors come from the folder name (``DV<t>x<s>x<s>``) unless given; the Cosmos
DV models use FSQ levels ``[8, 8, 8, 5, 5, 5]``, hence the default vocabulary of 64000.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from localopt_plugin.registry import register
from localopt_plugin.tokenizers.base import VideoTokenizer, frames_to_tensor, tensor_to_frames

ENCODER_FILE = "encoder.jit"
DECODER_FILE = "decoder.jit"
COSMOS_DV_VOCAB = 64000


@dataclass(frozen=True)
class TorchScriptConfig:
    """A TorchScript tokenizer folder and what its name does not say."""

    path: str
    vocab_size: int = COSMOS_DV_VOCAB
    temporal_compression: int | None = None
    spatial_compression: int | None = None
    device: str = "cpu"
    dtype: str = "float32"


class TorchScriptTokenizer(VideoTokenizer):
    """A folder holding ``encoder.jit`` and ``decoder.jit``; see the module doc."""

    def __init__(self, path: str | Path, vocab_size: int = COSMOS_DV_VOCAB,
                 temporal_compression: int | None = None,
                 spatial_compression: int | None = None, device: str = "cpu",
                 dtype: str = "float32") -> None:
        self.path = Path(path)
        files = [self.path / ENCODER_FILE, self.path / DECODER_FILE]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"TorchScript tokenizer folder {self.path} lacks {', '.join(missing)}; it must "
                f"hold {ENCODER_FILE} and {DECODER_FILE} (e.g. a downloaded Cosmos DV tokenizer)")
        match = re.search(r"DV(\d+)x(\d+)x\d+", self.path.name)
        if temporal_compression is None or spatial_compression is None:
            if match is None:
                raise ValueError(f"cannot read the compression factors from the folder name "
                                 f"{self.path.name!r}; pass temporal_compression and "
                                 "spatial_compression")
            temporal_compression = temporal_compression or int(match.group(1))
            spatial_compression = spatial_compression or int(match.group(2))
        self._vocab_size = vocab_size
        self._ct, self._cs = temporal_compression, spatial_compression
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        with warnings.catch_warnings():  # deprecated in torch 2.13, yet the format shipped
            warnings.filterwarnings("ignore", "`torch.jit", DeprecationWarning)
            self.encoder = torch.jit.load(str(files[0]), map_location=self.device).eval()
            self.decoder = torch.jit.load(str(files[1]), map_location=self.device).eval()
        digest = hashlib.sha256()
        for f in files:
            with f.open("rb") as handle:
                for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(chunk)
        self._fingerprint = f"torchscript-{digest.hexdigest()[:16]}"

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def temporal_compression(self) -> int:
        return self._ct

    @property
    def spatial_compression(self) -> int:
        return self._cs

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> np.ndarray:
        x = frames_to_tensor(self._check_frames(frames)).to(self.device, self.dtype)
        out = self.encoder(x)
        ids = out[0] if isinstance(out, tuple | list) else out
        return ids[0].long().cpu().numpy()

    @torch.no_grad()
    def decode(self, ids: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(self._check_ids(ids)).unsqueeze(0).to(self.device)
        return tensor_to_frames(self.decoder(ids).float().cpu())


@register("tokenizer", "torchscript", config=TorchScriptConfig)
def build_torchscript(config: TorchScriptConfig) -> TorchScriptTokenizer:
    return TorchScriptTokenizer(config.path, config.vocab_size, config.temporal_compression,
                                config.spatial_compression, config.device, config.dtype)
