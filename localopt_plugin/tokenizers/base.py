"""The video tokenizer interface shared by the embedded model and pretrained adapters.

Why an interface: data preprocessing, the main job and evaluation only need ``encode``/``decode``
and the latent geometry, so a pretrained tokenizer (e.g. a Cosmos DV folder) can replace the
embedded one without touching them. Manifests record ``fingerprint`` so token shards made with
one tokenizer are never decoded with another.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch


class VideoTokenizer(ABC):
    """Discrete video tokenizer: uint8 frames ``[T, H, W, 3]`` <-> token ids ``[F, h, w]``.

    Temporal compression is causal: ``T = 1 + c_t * k`` frames map to ``F = 1 + k`` latent
    frames (the first frame is encoded alone), and each latent frame is ``H / c_s`` by
    ``W / c_s`` ids in ``[0, vocab_size)``.
    """

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def temporal_compression(self) -> int: ...

    @property
    @abstractmethod
    def spatial_compression(self) -> int: ...

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """A short stable id of the weights and configuration, for manifests."""

    @abstractmethod
    def encode(self, frames: np.ndarray) -> np.ndarray:
        """uint8 ``[T, H, W, 3]`` -> int64 ids ``[F, h, w]``."""

    @abstractmethod
    def decode(self, ids: np.ndarray) -> np.ndarray:
        """int ids ``[F, h, w]`` -> uint8 frames ``[T, H, W, 3]``."""

    def latent_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """``(F, h, w)`` of the ids for a clip of this size; raises if the size is not valid."""
        ct, cs = self.temporal_compression, self.spatial_compression
        if num_frames < 1 or (num_frames - 1) % ct:
            raise ValueError(f"num_frames must be 1 + {ct}*k, got {num_frames}")
        if height % cs or width % cs:
            raise ValueError(f"height and width must be multiples of {cs}, got {height}x{width}")
        return 1 + (num_frames - 1) // ct, height // cs, width // cs

    def _check_frames(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} "
                             f"{list(frames.shape)}")
        self.latent_grid(*frames.shape[:3])
        return frames

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integer [F, h, w], got {ids.dtype} {list(ids.shape)}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids outside [0, {self.vocab_size})")
        return ids.astype(np.int64)


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> float ``[1, 3, T, H, W]`` in [-1, 1] (Cosmos' convention)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1.0)
    return x.permute(3, 0, 1, 2).unsqueeze(0)


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """float ``[1, 3, T, H, W]`` in [-1, 1] -> uint8 ``[T, H, W, 3]``."""
    x = x[0].permute(1, 2, 3, 0).clamp(-1, 1).add(1).mul(127.5).round()
    return x.to(torch.uint8).numpy()
