"""From a trainer checkpoint to videos: model, conditions, decoding and output files.

Why here and not in the CLI: evaluation and notebooks need the same steps (rebuild the model,
find the dataset's tokenizer, encode class labels or prompts the way the loader did, decode
token grids to frames).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from localopt_plugin.data.layout import SampleLayout, Vocabulary
from localopt_plugin.data.manifest import Manifest, fingerprint_file, load_manifest
from localopt_plugin.errors import UserError
from localopt_plugin.tokenizers.base import VideoTokenizer

log = logging.getLogger(__name__)


@dataclass
class GenerationContext:
    """A trained model and what is needed to condition it and to decode its tokens."""

    model: torch.nn.Module
    meta: dict
    vocab: Vocabulary
    layout: SampleLayout
    manifest: Manifest | None  # None for datasets without shards (synthetic tokens)
    tokenizer: VideoTokenizer | None = None
    text_processor: object | None = None  # sentencepiece, for caption-conditioned data

    @property
    def latent_hw(self) -> tuple[int, int]:
        """``(h, w)`` of one latent frame: the manifest's grid, else the squarest split."""
        if self.manifest is not None:
            return tuple(self.manifest.latent_grid[1:])
        p = self.layout.frame_tokens
        h = max(d for d in range(1, math.isqrt(p) + 1) if p % d == 0)
        return h, p // h


def manifest_path_from_meta(meta: dict) -> str | None:
    """The manifest the checkpoint was trained on, from its saved ``data_info``.

    The trainer stores the manifest JSON-serialised with ``default=str``, i.e. as the
    dataclass repr; its ``path`` field locates the file (a dict with ``path`` works too).
    """
    manifest = meta.get("data_info", {}).get("manifest")
    if isinstance(manifest, dict):
        return manifest.get("path")
    if isinstance(manifest, str):
        found = re.search(r"\bpath=(['\"])(.*?)\1", manifest)
        return found.group(2) if found else None
    return None


def load_tokenizer(manifest: Manifest, tokenizer_path: str | None = None) -> VideoTokenizer:
    """The video tokenizer the shards were made with; its fingerprint must match.

    ``tokenizer_path``: the tokenizer's ``path`` option (a weights file or folder) when it is
    not where the tokenizer looks by default."""
    from localopt_plugin.tokenizers import build_tokenizer

    options = {"path": tokenizer_path} if tokenizer_path else {}
    try:
        tokenizer = build_tokenizer(manifest.tokenizer, **options)
    except UserError as err:
        raise UserError(f"{manifest.path} names tokenizer {manifest.tokenizer!r}: {err} "
                        f"(--tokenizer-path?)") from None
    if tokenizer.fingerprint != manifest.tokenizer_fingerprint:
        raise UserError(f"tokenizer {manifest.tokenizer!r} has fingerprint "
                         f"{tokenizer.fingerprint} but {manifest.path} was made with "
                         f"{manifest.tokenizer_fingerprint}")
    return tokenizer


def _text_processor(manifest: Manifest):
    """The captions' sentencepiece model, checked against the manifest's fingerprint."""
    import sentencepiece

    path = manifest.text_model_path()
    if not os.path.exists(path):
        raise UserError(f"sentencepiece model {path} (of {manifest.path}) not found")
    if fingerprint_file(path) != manifest.text_tokenizer.fingerprint:
        raise UserError(f"sentencepiece model {path} does not match the fingerprint "
                         f"in {manifest.path}")
    return sentencepiece.SentencePieceProcessor(model_file=path)


def load_context(checkpoint: str, tag: str | None = None, manifest_path: str | None = None,
                 tokenizer_path: str | None = None, decode: bool = True) -> GenerationContext:
    """Rebuild the model (needs ``init_distributed()``) and find its data's tokenizers."""
    from localopt_plugin.training.convert import load_trained_model

    model, meta = load_trained_model(checkpoint, tag)
    vocab, layout = Vocabulary(**meta["vocabulary"]), SampleLayout(**meta["layout"])
    manifest_path = manifest_path or manifest_path_from_meta(meta)
    manifest = None
    if manifest_path is not None:
        if not os.path.exists(manifest_path):
            raise UserError(f"the checkpoint's data manifest {manifest_path} is gone; "
                             f"pass --manifest")
        manifest = load_manifest(manifest_path)
        if manifest.latent_grid[1] * manifest.latent_grid[2] != layout.frame_tokens:
            raise UserError(f"{manifest_path}'s latent grid {manifest.latent_grid} "
                             f"does not fit the checkpoint's {layout.frame_tokens} tokens/frame")
    context = GenerationContext(model, meta, vocab, layout, manifest)
    if manifest is not None and decode:
        context.tokenizer = load_tokenizer(manifest, tokenizer_path)
    if vocab.text_vocab_size:
        if manifest is None or manifest.text_tokenizer is None:
            raise UserError("the checkpoint is caption-conditioned but no manifest "
                             "names its sentencepiece model; pass --manifest")
        context.text_processor = _text_processor(manifest)
    return context


def class_conditions(vocab: Vocabulary, labels: list[int]) -> torch.Tensor:
    """Condition ids ``[b, 1]`` of class labels."""
    return torch.tensor([[vocab.class_token(label)] for label in labels], dtype=torch.long)


def prompt_conditions(vocab: Vocabulary, layout: SampleLayout, processor,
                      prompts: list[str]) -> torch.Tensor:
    """Condition ids ``[b, max_text_tokens]``, built exactly as the loader builds them."""
    from localopt_plugin.data.inputs import caption_ids

    length = layout.video_start - 2
    return torch.from_numpy(np.stack([caption_ids(processor, p, vocab, length)
                                      for p in prompts]))


def token_images(tokens: np.ndarray, vocab_size: int, hw: tuple[int, int],
                 scale: int = 8) -> np.ndarray:
    """Token grids ``[F, P]`` as uint8 frames, one fixed colour per id (no tokenizer needed)."""
    palette = np.random.default_rng(0).integers(0, 256, size=(vocab_size, 3), dtype=np.uint8)
    frames = palette[tokens.reshape(tokens.shape[0], *hw)]
    return frames.repeat(scale, axis=1).repeat(scale, axis=2)


def decode_videos(context: GenerationContext, tokens: torch.Tensor) -> list[np.ndarray]:
    """uint8 ``[T, H, W, 3]`` per sample of ``[b, F, P]`` tokens (token images if no tokenizer)."""
    grids = tokens.cpu().numpy()
    hw = context.latent_hw
    if context.tokenizer is None:
        return [token_images(g, context.vocab.video_vocab_size, hw) for g in grids]
    return [context.tokenizer.decode(g.reshape(g.shape[0], *hw)) for g in grids]


def write_videos(out_dir: str | Path, videos: list[np.ndarray], names: list[str], fps: int,
                 mp4: bool = True) -> list[Path]:
    """``<name>.mp4`` (if ``mp4``) and ``<name>.gif`` per video plus ``grid.png``."""
    from localopt_plugin.video.io import save_grid_png, write_gif, write_mp4

    out_dir = Path(out_dir)
    written = []
    for video, name in zip(videos, names, strict=True):
        if mp4:
            written.append(write_mp4(out_dir / f"{name}.mp4", video, fps=fps))
        written.append(write_gif(out_dir / f"{name}.gif", video, fps=fps))
    written.append(save_grid_png(out_dir / "grid.png", videos))
    return written
