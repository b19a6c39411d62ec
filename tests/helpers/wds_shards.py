"""Writes small video-token webdataset shards and manifests for the video-wds tests."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece
import webdataset as wds

from localopt_plugin.data.manifest import (
    Manifest,
    TextTokenizer,
    fingerprint_file,
    load_manifest,
    shard_sample_counts,
)

GRID = (2, 3, 4)
VOCAB = 50
CLASSES = 5
WORDS = ("a red ball rolls left while the blue cube falls down past two birds flying over "
         "the green lake and a small dog runs after the cat in the park at night").split()


@dataclass
class Written:
    manifest: Manifest
    pattern: str  # brace pattern of the shards
    samples: dict[str, dict]  # key -> {"tokens", "cls", "txt"}
    shards: list[Path]


def caption(i: int) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))


def train_text_model(path: Path) -> Path:
    """A tiny sentencepiece model trained on the test captions."""
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([caption(i) for i in range(200)]), model_writer=proto,
        vocab_size=64, hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(proto.getvalue())
    return path


def write_dataset(directory: Path, num_samples: int, per_shard: int, *, name: str = "d",
                  seed: int = 0, text_model: Path | None = None, max_text_tokens: int = 6,
                  mutate=None) -> Written:
    """Shards written with webdataset's ShardWriter, and their manifest.

    ``mutate(index, sample)`` may edit a sample (a dict for ShardWriter) before it is written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = {}
    with wds.ShardWriter(str(directory / f"{name}-%06d.tar"), maxcount=per_shard,
                         verbose=0) as sink:
        for i in range(num_samples):
            key = f"{name}{i:05d}"
            tokens = rng.integers(0, VOCAB, size=GRID).astype(np.int16)
            sample = {"__key__": key, "tokens.npy": tokens, "cls": i % CLASSES,
                      "txt": caption(seed * 1000 + i),
                      "json": {"source": f"clip{i}.mp4", "start": 0.5 * i, "fps": 8.0,
                               "frames": [0, 4]}}
            samples[key] = {"tokens": tokens, "cls": i % CLASSES, "txt": sample["txt"]}
            if mutate is not None:
                mutate(i, sample)
            sink.write(sample)
    shards = sorted(directory.glob(f"{name}-*.tar"))
    text = None
    if text_model is not None:
        size = sentencepiece.SentencePieceProcessor(model_file=str(text_model)).get_piece_size()
        text = TextTokenizer(str(text_model), fingerprint_file(str(text_model)), size)
    counts = shard_sample_counts(str(s) for s in shards)
    manifest = Manifest(
        tokenizer="test-vq", tokenizer_fingerprint="sha256:test", video_vocab_size=VOCAB,
        latent_grid=GRID, source_frames=5, source_resolution=(32, 32), shards=counts,
        condition="text" if text else "class", num_classes=CLASSES, text_tokenizer=text,
        max_text_tokens=max_text_tokens if text else 0)
    manifest_path = manifest.write(str(directory))
    return Written(load_manifest(manifest_path),
                   str(directory / f"{name}-{{000000..{len(shards) - 1:06d}}}.tar"), samples,
                   shards)

