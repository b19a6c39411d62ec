"""Stages 2 and 3, read and decode/validate: tar members -> checked samples, bad ones counted.

A bad sample never stops a worker by itself: it is skipped and counted by reason. Only more
bad samples than ``--max-bad-sample-fraction`` of what a worker read ends the run
(:class:`BadDataError`), since that means broken data rather than a stray corrupt file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import webdataset as wds

from localopt_plugin.data.manifest import Manifest, load_manifest
from localopt_plugin.data.wds.shards import Shard

log = logging.getLogger(__name__)

# Reasons a sample is skipped (the keys of the skip counters).
TRUNCATED = "corrupt or truncated shard"
MISSING_TOKENS = "missing tokens.npy"
BAD_TOKENS = "unreadable tokens.npy"
GRID_MISMATCH = "grid does not match the manifest"
OUT_OF_VOCAB = "token id outside the video vocabulary"
MISSING_CONDITION = "missing condition (cls/txt)"
BAD_CONDITION = "unreadable or out-of-range condition"


class BadDataError(RuntimeError):
    """More bad samples than ``--max-bad-sample-fraction`` allows."""


@dataclass
class Sample:
    key: str
    tokens: np.ndarray  # [F, h, w]
    label: int  # -1 for caption-conditioned data
    caption: str | None


def decode(raw: dict, manifest: Manifest) -> Sample | str:
    """The sample, or why it is bad (never raises on bad bytes)."""
    if "tokens.npy" not in raw:
        return MISSING_TOKENS
    condition = "cls" if manifest.condition == "class" else "txt"
    if condition not in raw:
        return MISSING_CONDITION
    try:
        tokens = np.load(io.BytesIO(raw["tokens.npy"]), allow_pickle=False)
    except Exception:  # garbled bytes raise ValueError, EOFError, TokenError, TypeError...
        return BAD_TOKENS
    if tokens.dtype.kind not in "iu":
        return BAD_TOKENS
    if tokens.shape != tuple(manifest.latent_grid):
        return GRID_MISMATCH
    if tokens.size and (tokens.min() < 0 or tokens.max() >= manifest.video_vocab_size):
        return OUT_OF_VOCAB
    try:  # only the field conditioning uses is read: a bad other one costs nothing
        if manifest.condition == "text":
            return Sample(raw["__key__"], tokens, -1, raw["txt"].decode())
        label = int(raw["cls"])
    except (UnicodeDecodeError, ValueError):
        return BAD_CONDITION
    if not 0 <= label < manifest.num_classes:
        return BAD_CONDITION
    return Sample(raw["__key__"], tokens, label, None)


class SkipCounter:
    """Samples read and skipped (by reason) by one slot; enforces the bad-sample limit."""

    def __init__(self, where: str, max_bad_fraction: float, minimum_judged: int) -> None:
        self.where, self.max_bad_fraction = where, max_bad_fraction
        self.minimum_judged = minimum_judged  # never judge on less than one epoch share
        self.read = 0
        self.bad: Counter[str] = Counter()

    def good(self) -> None:
        self.read += 1

    def skip(self, reason: str, count: int, what: str) -> None:
        self.bad[reason] += count
        self.read += count
        total = sum(self.bad.values())
        log.warning("skipped %d bad sample(s), %s: %s (%s: %d of %d read skipped so far: %s)",
                    count, reason, what, self.where, total, self.read, dict(self.bad))
        if total > self.max_bad_fraction * max(self.read, self.minimum_judged):
            raise BadDataError(
                f"{self.where} skipped {total} bad samples of {self.read} read "
                f"({dict(self.bad)}), more than --max-bad-sample-fraction "
                f"{self.max_bad_fraction} allows; last: {reason}: {what}")


def read_shard(shard: Shard, manifest: Manifest, counter: SkipCounter) -> Iterator[Sample]:
    """A shard's good samples in file order; a tar that ends early counts the rest as bad."""
    errors: list[Exception] = []

    def keep_going(exn: Exception) -> bool:
        errors.append(exn)
        return True

    raw_count = 0
    for raw in wds.tariterators.tarfile_samples(iter([{"url": shard.url}]), handler=keep_going):
        raw_count += 1
        sample = decode(raw, manifest)
        if isinstance(sample, str):
            counter.skip(sample, 1, f"sample {raw['__key__']!r} of {shard.url}")
            continue
        counter.good()
        yield sample
    if raw_count < shard.samples:
        why = f": {errors[0]}" if errors else ""
        counter.skip(TRUNCATED, shard.samples - raw_count,
                     f"{shard.url} ended after {raw_count} of {shard.samples} samples{why}")
    elif errors:
        log.warning("%s: read all %d samples despite errors: %s", shard.url, raw_count, errors)


def sample_digests(manifest_path: str) -> list[str]:
    """A content digest (tokens and class) of every sample of a manifest's shards: what tells
    whether two splits share clips."""
    manifest = load_manifest(manifest_path)
    counter = SkipCounter(manifest_path, max_bad_fraction=1.0, minimum_judged=1)
    digests = []
    for name, count in manifest.shards.items():
        url = os.path.join(os.path.dirname(manifest_path), name)
        digests += [token_digest(s.tokens, s.label) for s in read_shard(Shard(url, count),
                                                                         manifest, counter)]
    return digests


def token_digest(tokens: np.ndarray, label: int) -> str:
    """The digest :func:`sample_digests` gives a sample's ``[F, h, w]`` tokens and class."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes()
                          + str(label).encode()).hexdigest()
