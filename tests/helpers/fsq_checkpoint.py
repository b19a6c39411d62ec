"""Video-token shards of procedural clips encoded with the embedded ``fsq-video`` tokenizer,
and a tiny model trained on them: the checkpoint the generation/evaluation tests start from.

Built here (not with localopt_plugin/preprocess/) so these tests depend only on the tokenizer,
webdataset's ShardWriter and the manifest helpers.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import webdataset as wds

from helpers.launch import run_train
from localopt_plugin.data.manifest import Manifest, load_manifest, shard_sample_counts
from localopt_plugin.data.procedural import NUM_CLASSES, render_video
from localopt_plugin.tokenizers import build_tokenizer

FRAMES, SIZE = 9, 32  # -> latent grid (3, 8, 8) with fsq-video's 4x4x4 compression
TRAIN_FLAGS = (
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--position-embedding-type", "rope",
    "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
    "--lr", "1e-3", "--log-interval", "1", "--zero-stage", "1", "--data-num-workers", "0",
    "--objective", "local-opt", "--local-opt-window-frames", "2", "--eval-iters", "1",
)


def write_fsq_shards(directory: Path, num_samples: int = 6, per_shard: int = 3) -> Manifest:
    """Encode ``num_samples`` procedural clips (class ``i % 12``, seed ``i``) into shards."""
    tokenizer = build_tokenizer("fsq-video")
    directory.mkdir(parents=True, exist_ok=True)
    grid = tokenizer.latent_grid(FRAMES, SIZE, SIZE)
    with wds.ShardWriter(str(directory / "fsq-%06d.tar"), maxcount=per_shard,
                         verbose=0) as sink:
        for i in range(num_samples):
            ids = tokenizer.encode(render_video(i % NUM_CLASSES, seed=i, num_frames=FRAMES,
                                                size=SIZE))
            sink.write({"__key__": f"clip{i:04d}", "tokens.npy": ids.astype(np.int16),
                        "cls": i % NUM_CLASSES})
    shards = sorted(directory.glob("fsq-*.tar"))
    manifest = Manifest(
        tokenizer="fsq-video", tokenizer_fingerprint=tokenizer.fingerprint,
        video_vocab_size=tokenizer.vocab_size, latent_grid=grid, source_frames=FRAMES,
        source_resolution=(SIZE, SIZE), shards=shard_sample_counts(str(s) for s in shards),
        condition="class", num_classes=NUM_CLASSES)
    return load_manifest(manifest.write(str(directory)))


def shard_pattern(manifest: Manifest) -> str:
    return str(Path(manifest.directory) / f"fsq-{{000000..{len(manifest.shards) - 1:06d}}}.tar")


@functools.cache
def train_fsq_checkpoint(tmp_path: Path) -> tuple[Path, Manifest]:
    """A tiny GPT trained 2 iterations on fsq-video shards by the main trainer (once per
    directory, so the generation and evaluation tests share one run)."""
    manifest = write_fsq_shards(tmp_path / "shards")
    ckpt = tmp_path / "ckpt"
    pattern = shard_pattern(manifest)
    run_train(tmp_path, *TRAIN_FLAGS, "--dataset", "video-wds", "--data-path", pattern,
              "--valid-data-path", pattern, "--save", str(ckpt), name="fsq-train")
    return ckpt, manifest
