"""Shards: which videos each holds, who writes it, and how a finished one is recognised.

Why this layout:

* Shard ``i`` holds every clip of videos ``[i*V, (i+1)*V)`` of the global input order, in that
  order. Its contents depend only on the inputs and settings, never on the number of ranks, so
  any rank count produces the same files. (Counts differ between shards when videos are
  rejected or yield fewer clips; the manifest records each count.)
* Rank ``r`` of ``R`` writes shards ``i = r (mod R)``. The final name ``<prefix>-<i>.tar``
  carries the global index (so ``--data-path`` brace ranges work for any ``R``); the rank is in
  the temporary name, the shard's record and the manifest.
* A shard is written by webdataset's ``ShardWriter`` (``start_shard=i``) to
  ``.<prefix>-<i>.tar.rank<r>.tmp`` with fixed tar metadata (mtime 0, fixed owner), so the
  bytes are reproducible, then renamed into place; afterwards a record
  ``.preprocess/<prefix>-<i>.json`` (count, size, sha256, rejects, settings digest) is
  written the same way. A shard counts as done only when its record matches the settings and
  the tar's size and hash: a killed run restarts exactly the unfinished shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import webdataset as wds

from localopt_plugin.errors import UserError
from localopt_plugin.preprocess.clips import ClipSpec, RejectedVideo, load_clips
from localopt_plugin.preprocess.inputs import VideoInput
from localopt_plugin.tokenizers.base import VideoTokenizer

STATE_DIR = ".preprocess"
# Tar member metadata fixed so that a shard's bytes depend on its samples only.
TAR_OPTIONS = {"mtime": 0, "user": "localopt", "group": "localopt", "mode": 0o444}


@dataclass(frozen=True)
class ShardPlan:
    """Shard ``i`` = videos ``[i * videos_per_shard, (i + 1) * videos_per_shard)``."""

    num_videos: int
    videos_per_shard: int
    prefix: str = "train"

    @property
    def num_shards(self) -> int:
        return -(-self.num_videos // self.videos_per_shard)

    def name(self, shard: int) -> str:
        return f"{self.prefix}-{shard:06d}.tar"

    def videos(self, shard: int) -> range:
        first = shard * self.videos_per_shard
        return range(first, min(first + self.videos_per_shard, self.num_videos))

    def owned(self, rank: int, world: int) -> list[int]:
        return list(range(rank, self.num_shards, world))


@dataclass
class ShardRecord:
    """What a finished shard holds; its JSON file is the shard's completion marker."""

    name: str
    samples: int
    bytes: int
    sha256: str
    videos: list[int]  # [first, end) of the global video order
    rejects: list[dict]  # {"path", "reason"} in video order
    rank: int
    settings: str  # digest of everything that determines the shard's contents


def settings_digest(inputs: list[VideoInput], spec: ClipSpec, tokenizer: str,
                    fingerprint: str, plan: ShardPlan) -> str:
    """Identifies the dataset's contents, so a resumed run never mixes in shards of another."""
    blob = json.dumps({"inputs": [[v.source, v.key, v.label, v.caption] for v in inputs],
                       "clips": vars(spec), "tokenizer": [tokenizer, fingerprint],
                       "plan": vars(plan)}, sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _write_json(path: str, obj: object) -> None:
    """Atomically: a reader sees the old file, the complete new one, or none."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def record_path(out: str, name: str) -> str:
    return os.path.join(out, STATE_DIR, name.removesuffix(".tar") + ".json")


def finished(out: str, name: str, settings: str) -> ShardRecord | None:
    """The shard's record if it is complete and made with these settings, else None."""
    path = record_path(out, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = ShardRecord(**json.load(f))
    if record.settings != settings:
        raise UserError(f"{out} holds shard {name} made with other inputs or settings; "
                         "use a new --output directory (or delete that one)")
    tar = os.path.join(out, name)
    if (not os.path.exists(tar) or os.path.getsize(tar) != record.bytes
            or _sha256(tar) != record.sha256):
        return None  # written over or damaged since: make it again
    return record


def encode_clips(tokenizer: VideoTokenizer, clips: list[np.ndarray]) -> list[np.ndarray]:
    """Token ids of each clip; one call when the tokenizer has ``encode_batch`` (e.g. on GPU)."""
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is not None:
        return list(batch(np.stack(clips)))
    return [tokenizer.encode(c) for c in clips]


def write_shard(out: str, plan: ShardPlan, shard: int, inputs: list[VideoInput],
                spec: ClipSpec, tokenizer: VideoTokenizer, rank: int, settings: str,
                on_video: Callable[[int], None] = lambda clips: None) -> ShardRecord:
    """Tokenize the shard's videos and write it; ``on_video(clips)`` reports progress."""
    name = plan.name(shard)
    dtype = np.int16 if tokenizer.vocab_size <= np.iinfo(np.int16).max + 1 else np.int32
    tmp = os.path.join(out.replace("%", "%%"), f".{plan.prefix}-%06d.tar.rank{rank}.tmp")
    rejects, samples = [], 0
    with wds.ShardWriter(tmp, maxcount=1 << 62, maxsize=float("inf"), start_shard=shard,
                         verbose=0, **TAR_OPTIONS) as sink:
        for index in plan.videos(shard):
            video = inputs[index]
            try:
                clips = load_clips(video, spec)
            except RejectedVideo as why:
                rejects.append({"path": video.source, "reason": str(why)})
                on_video(0)
                continue
            ids_per_clip = encode_clips(tokenizer, [clip.frames for clip in clips])
            for n, (clip, ids) in enumerate(zip(clips, ids_per_clip, strict=True)):
                sample = {"__key__": f"{video.key}_{n:03d}", "tokens.npy": ids.astype(dtype),
                          "cls": video.label,
                          "json": {"source": video.source, "start": round(clip.start, 6),
                                   "fps": round(clip.fps, 6), "frames": clip.indices}}
                if video.caption is not None:
                    sample["txt"] = video.caption
                sink.write(sample)
            samples += len(clips)
            on_video(len(clips))
        written = sink.fname
    final = os.path.join(out, name)
    os.replace(written, final)
    record = ShardRecord(name, samples, os.path.getsize(final), _sha256(final),
                         [plan.videos(shard).start, plan.videos(shard).stop], rejects, rank,
                         settings)
    _write_json(record_path(out, name), vars(record))
    return record
