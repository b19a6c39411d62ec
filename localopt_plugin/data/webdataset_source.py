"""The ``video-wds`` dataset: video-token webdataset shards streamed with blends and exact resume.

Format: docs/data-format.md. Every data-parallel rank ``r`` of ``R`` runs ``W`` sample streams
("slots"), one per DataLoader worker (``W = max(1, --data-num-workers)``). What a slot yields
is a pure function of ``(seed, r, w)`` and the sample's index in the slot, which is what makes
resuming exact:

* Per blend component and epoch ``e``, the shard list is shuffled with ``(seed, component, e)``
  and split like webdataset's ``split_by_node`` then ``split_by_worker``
  (``shards[r::R][w::W]``, with the trainer's data-parallel rank, not the global rank those
  read from the environment). The slot reads its shards in that order, drops bad samples and
  shuffles the rest with webdataset's buffer shuffle seeded by ``(seed, component, r, w, e)``.
* A slot takes exactly ``Q = ceil(N / (R*W))`` samples of a component per epoch (``N``: the
  manifest's count). A slot that reads fewer (fewer shards, bad samples) tops up from shards
  drawn with a seeded generator; one that reads more stops. So every rank yields the same
  number of batches (no DDP hang), and epoch boundaries sit at known positions.
* Sample ``i`` of a slot comes from the component drawn for ``i`` with the blend weights, and
  its condition becomes the null condition with ``--null-condition-prob``; both draws come
  from generators seeded by ``(seed, r, w, i // 4096)``.
* Slot ``w`` yields micro-batches of consecutive samples, and the DataLoader takes workers
  round-robin: micro-batch ``k`` of a rank is micro-batch ``k // W`` of slot ``k % W``.

Resuming after ``k = consumed_samples / (micro_batch * R)`` micro-batches per rank makes
DataLoader worker ``d`` play slot ``(d + k) % W`` and skip that slot's consumed samples: the
blend draws are replayed (no I/O), whole component epochs are skipped by position, and at most
one epoch share ``Q`` per component is re-read and validated (tar read and npy parse, no input
building). It needs the same seed, data, ``R``, micro-batch size and ``--data-num-workers``.
"""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import braceexpand
import numpy as np
import sentencepiece
import torch
import webdataset as wds

from localopt_plugin.data.layout import SampleLayout, Vocabulary
from localopt_plugin.data.manifest import (
    MANIFEST_NAME,
    Manifest,
    check_compatible,
    fingerprint_file,
    load_manifest,
    with_overrides,
)
from localopt_plugin.data.source import VideoTokenSource
from localopt_plugin.platform import cuda_available
from localopt_plugin.registry import register

log = logging.getLogger(__name__)

_BLOCK = 4096  # slot samples per block of blend/null-condition draws
# Tags separating the seeded generators of one run.
_SHARD_ORDER, _SAMPLE_ORDER, _TOP_UP, _DRAWS = range(4)

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


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of the ``video-wds`` dataset (``--data-path``/``--valid-data-path`` are Megatron's)."""
    g = parser.add_argument_group("video-wds dataset")
    g.add_argument("--data-num-workers", type=int, default=2,
                   help="DataLoader workers per rank (0: read in the training process); the "
                   "sample order depends on it, so keep it when resuming")
    g.add_argument("--data-shuffle-buffer", type=int, default=1000,
                   help="samples in each worker's shuffle buffer")
    g.add_argument("--data-condition", choices=["class", "text"], default=None,
                   help="condition on the class label or the caption (default: the manifest's)")
    g.add_argument("--max-text-tokens", type=int, default=None,
                   help="caption tokens per sample, padded/truncated (default: the manifest's)")
    g.add_argument("--text-tokenizer-model", default=None,
                   help="sentencepiece model of the captions (default: the manifest's); its "
                   "fingerprint must match the manifest")
    g.add_argument("--null-condition-prob", type=float, default=0.0,
                   help="probability of replacing a training sample's condition with the null "
                   "condition (classifier-free guidance)")
    g.add_argument("--max-bad-sample-fraction", type=float, default=0.01,
                   help="stop the run when a worker has skipped more than this fraction of the "
                   "samples it read (never judged on less than one epoch share)")
    return parser


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


@dataclass(frozen=True)
class Component:
    """One dataset of a blend: its shards and its weight."""

    spec: str
    weight: float
    shards: tuple[Shard, ...]

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass(frozen=True)
class LoaderConfig:
    """Everything the workers need (pickled into them)."""

    components: tuple[Component, ...]
    manifest: Manifest  # with the flags' overrides: defines vocabulary and layout
    text_model: bytes | None = None  # the sentencepiece model proto
    null_condition_prob: float = 0.0
    max_bad_fraction: float = 0.01
    shuffle_buffer: int = 1000


def parse_blend(paths: list[str]) -> list[tuple[float, list[str]]]:
    """Megatron-style ``[w1 spec1 w2 spec2 ...]``, or unweighted specs forming one dataset."""
    try:
        float(paths[0])
    except ValueError:
        return [(1.0, list(paths))]
    if len(paths) % 2:
        raise SystemExit(f"error: a weighted --data-path needs weight/path pairs, got {paths}")
    blend = []
    for weight, spec in zip(paths[::2], paths[1::2], strict=True):
        try:
            w = float(weight)
        except ValueError:
            raise SystemExit(f"error: blend weight {weight!r} is not a number") from None
        if not w > 0:
            raise SystemExit(f"error: blend weight {weight} of {spec} must be positive")
        blend.append((w, [spec]))
    return blend


def resolve_components(paths: list[str]) -> tuple[list[Component], list[Manifest]]:
    """Expand brace patterns and look every shard up in the manifest next to it."""
    manifests: dict[str, Manifest] = {}
    components = []
    for weight, specs in parse_blend(paths):
        shards = []
        for url in (u for spec in specs for u in braceexpand.braceexpand(spec)):
            directory = os.path.dirname(os.path.abspath(url))
            if directory not in manifests:
                manifests[directory] = load_manifest(os.path.join(directory, MANIFEST_NAME))
            manifest = manifests[directory]
            name = os.path.basename(url)
            if name not in manifest.shards:
                raise SystemExit(f"error: shard {url} is not listed in {manifest.path}")
            if not os.path.exists(url):
                raise SystemExit(f"error: shard {url} does not exist")
            shards.append(Shard(url, manifest.shards[name]))
        component = Component(" ".join(specs), weight, tuple(shards))
        if component.num_samples == 0:
            raise SystemExit(f"error: --data-path {component.spec} holds no samples")
        components.append(component)
    return components, list(manifests.values())


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


@dataclass
class _Sample:
    key: str
    tokens: np.ndarray  # [F, h, w]
    label: int  # -1 for caption-conditioned data
    caption: str | None


def _decode(raw: dict, manifest: Manifest) -> _Sample | str:
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
            return _Sample(raw["__key__"], tokens, -1, raw["txt"].decode())
        label = int(raw["cls"])
    except (UnicodeDecodeError, ValueError):
        return BAD_CONDITION
    if not 0 <= label < manifest.num_classes:
        return BAD_CONDITION
    return _Sample(raw["__key__"], tokens, label, None)


class _SlotReader:
    """Slot ``(rank, worker)``: its samples in order, with the bad ones skipped and counted."""

    def __init__(self, cfg: LoaderConfig, seed: int, rank: int, dp_size: int, worker: int,
                 num_workers: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.rank, self.dp_size, self.worker, self.num_workers = rank, dp_size, worker, num_workers
        slots = dp_size * num_workers
        self.quotas = [math.ceil(c.num_samples / slots) for c in cfg.components]
        weights = np.array([c.weight for c in cfg.components], dtype=np.float64)
        self.cum_weights = np.cumsum(weights / weights.sum())[:-1]
        self.read = 0
        self.bad: Counter[str] = Counter()

    def _skip(self, reason: str, count: int, where: str) -> None:
        self.bad[reason] += count
        self.read += count
        total = sum(self.bad.values())
        log.warning("skipped %d bad sample(s), %s: %s (rank %d worker %d: %d of %d read "
                    "skipped so far: %s)", count, reason, where, self.rank, self.worker, total,
                    self.read, dict(self.bad))
        if total > self.cfg.max_bad_fraction * max(self.read, sum(self.quotas)):
            raise BadDataError(
                f"data-parallel rank {self.rank}, loader worker {self.worker} skipped {total} "
                f"bad samples of {self.read} read ({dict(self.bad)}), more than "
                f"--max-bad-sample-fraction {self.cfg.max_bad_fraction} allows; last: {reason}: "
                f"{where}")

    def shard(self, shard: Shard) -> Iterator[_Sample]:
        """A shard's good samples in file order; a tar that ends early counts the rest as bad."""
        errors: list[Exception] = []

        def keep_going(exn: Exception) -> bool:
            errors.append(exn)
            return True

        raw_count = 0
        for raw in wds.tariterators.tarfile_samples(iter([{"url": shard.url}]),
                                                    handler=keep_going):
            raw_count += 1
            sample = _decode(raw, self.cfg.manifest)
            if isinstance(sample, str):
                self._skip(sample, 1, f"sample {raw['__key__']!r} of {shard.url}")
                continue
            self.read += 1
            yield sample
        if raw_count < shard.samples:
            why = f": {errors[0]}" if errors else ""
            self._skip(TRUNCATED, shard.samples - raw_count,
                       f"{shard.url} ended after {raw_count} of {shard.samples} samples{why}")
        elif errors:
            log.warning("%s: read all %d samples despite errors: %s", shard.url, raw_count,
                        errors)

    def _top_up(self, c: int, epoch: int) -> Iterator[_Sample]:
        """Endless samples of shards drawn by size: fills a slot short of its epoch share."""
        rng = random.Random(_seed(self.seed, _TOP_UP, c, self.rank, self.worker, epoch))
        shards = self.cfg.components[c].shards
        sizes = [s.samples for s in shards]
        while True:
            yield from self.shard(rng.choices(shards, weights=sizes)[0])

    def _epoch(self, c: int, epoch: int) -> Iterator[_Sample]:
        """Exactly the slot's quota of component ``c`` for one epoch."""
        order = list(self.cfg.components[c].shards)
        random.Random(_seed(self.seed, _SHARD_ORDER, c, epoch)).shuffle(order)
        mine = itertools.islice(itertools.islice(order, self.rank, None, self.dp_size),
                                self.worker, None, self.num_workers)
        read = (sample for shard in mine for sample in self.shard(shard))
        rng = random.Random(_seed(self.seed, _SAMPLE_ORDER, c, self.rank, self.worker, epoch))
        buffer = self.cfg.shuffle_buffer
        shuffled = wds.shuffle(buffer, buffer, rng=rng)(read)
        return itertools.islice(itertools.chain(shuffled, self._top_up(c, epoch)),
                                self.quotas[c])

    def _component(self, c: int, start: int) -> Iterator[_Sample]:
        """Component ``c``'s samples for this slot from its ``start``-th on."""
        first, offset = divmod(start, self.quotas[c])
        for epoch in itertools.count(first):
            samples = self._epoch(c, epoch)
            for _ in itertools.islice(samples, offset):  # resume: re-read, do not build
                pass
            offset = 0
            yield from samples

    def _draws(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Component and null-condition draws of slot samples ``[block*4096, +4096)``."""
        rng = np.random.default_rng([self.seed, _DRAWS, self.rank, self.worker, block])
        components = np.searchsorted(self.cum_weights, rng.random(_BLOCK), side="right")
        return components, rng.random(_BLOCK) < self.cfg.null_condition_prob

    def samples(self, start: int) -> Iterator[tuple[_Sample, bool]]:
        """``(sample, use the null condition)`` from slot index ``start`` on."""
        n = len(self.cfg.components)
        first_block, within = divmod(start, _BLOCK)
        consumed = np.zeros(n, dtype=np.int64)
        for block in range(first_block):
            consumed += np.bincount(self._draws(block)[0], minlength=n)
        consumed += np.bincount(self._draws(first_block)[0][:within], minlength=n)
        streams = [self._component(c, int(consumed[c])) for c in range(n)]
        for block in itertools.count(first_block):
            components, nulls = self._draws(block)
            for i in range(within if block == first_block else 0, _BLOCK):
                yield next(streams[components[i]]), bool(nulls[i])


def caption_ids(processor, caption: str, vocab: Vocabulary, length: int) -> np.ndarray:
    """Caption pieces truncated to ``length``, shifted into the shared id space, then padded."""
    pieces = processor.encode(caption, out_type=int)[:length]
    ids = np.full(length, vocab.pad, dtype=np.int64)
    ids[: len(pieces)] = np.asarray(pieces, dtype=np.int64) + vocab.text_token(0)
    return ids


class _InputBuilder:
    """``[BOS, condition..., BOV, frames..., EOV]`` in the shared id space."""

    def __init__(self, cfg: LoaderConfig) -> None:
        self.vocab, self.layout = cfg.manifest.vocab, cfg.manifest.layout
        self.text = (sentencepiece.SentencePieceProcessor(model_proto=cfg.text_model)
                     if cfg.manifest.condition == "text" else None)
        self.null = np.full(self.layout.video_start - 2, self.vocab.null_condition,
                            dtype=np.int64)
        if self.text is not None:
            self.null[1:] = self.vocab.pad  # [null, pad, ...]: a fixed-length null caption

    def condition(self, sample: _Sample, null: bool) -> np.ndarray:
        if null:
            return self.null
        if self.text is None:
            return np.array([self.vocab.class_token(sample.label)], dtype=np.int64)
        return caption_ids(self.text, sample.caption, self.vocab, self.null.size)

    def __call__(self, sample: _Sample, null: bool) -> np.ndarray:
        layout, vocab = self.layout, self.vocab
        out = np.empty(layout.seq_length, dtype=np.int64)
        out[0], out[layout.video_start - 1], out[-1] = vocab.bos, vocab.bov, vocab.eov
        out[1: layout.video_start - 1] = self.condition(sample, null)
        out[layout.video_start: -1] = sample.tokens.reshape(-1)
        return out


def _collate(tokens: list[np.ndarray], samples: list[_Sample], nulls: list[bool],
             layout: SampleLayout) -> dict:
    """Model inputs: Megatron's names, plus the full ``tokens`` the plugin's objectives use."""
    batch = torch.from_numpy(np.stack(tokens))
    size, inputs = batch.shape[0], layout.input_length
    loss_mask = torch.zeros(size, inputs)
    loss_mask[:, slice(*layout.label_span(0, layout.num_frames))] = 1.0
    return {
        "tokens": batch,
        "labels": batch[:, 1:].clone(),
        "loss_mask": loss_mask,  # 1 where the label is a video token
        "position_ids": torch.arange(inputs).repeat(size, 1),
        "label": torch.tensor([s.label for s in samples]),
        "null_condition": torch.tensor(nulls),
        "keys": [s.key for s in samples],
    }


class _RankStream(torch.utils.data.IterableDataset):
    """One rank's micro-batches; each DataLoader worker runs one slot."""

    def __init__(self, cfg: LoaderConfig, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, consumed_micro_batches: int, num_slots: int) -> None:
        self.cfg, self.micro_batch_size = cfg, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed, self.num_slots = consumed_micro_batches, num_slots

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        slot = ((info.id if info else 0) + self.consumed) % self.num_slots
        done = len(range(slot, self.consumed, self.num_slots))  # its micro-batches consumed
        reader = _SlotReader(self.cfg, self.seed, self.dp_rank, self.dp_size, slot,
                             self.num_slots)
        build = _InputBuilder(self.cfg)
        samples = reader.samples(done * self.micro_batch_size)
        while True:
            drawn = list(itertools.islice(samples, self.micro_batch_size))
            batch = _collate([build(s, null) for s, null in drawn], [s for s, _ in drawn],
                             [null for _, null in drawn], self.cfg.manifest.layout)
            yield batch, (slot, dict(reader.bad))


@dataclass
class WebDatasetSource:
    """A BatchSource over video-token shards (see the module docstring for the order)."""

    config: LoaderConfig
    num_workers: int = 2
    # skip counts by reason, per (dp rank, slot), as last reported by the workers
    skipped: dict[tuple[int, int], dict[str, int]] = field(default_factory=dict)

    def skipped_samples(self) -> Counter[str]:
        """Bad samples skipped so far, by reason, over the ranks and slots read here."""
        total: Counter[str] = Counter()
        for counts in self.skipped.values():
            total.update(counts)
        return total

    def batches(self, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                consumed_samples: int = 0) -> Iterator[dict]:
        step = micro_batch_size * dp_size
        if consumed_samples % step:
            raise ValueError(f"consumed samples {consumed_samples} is not a multiple of {step}")
        slots = max(1, self.num_workers)
        stream = _RankStream(self.config, micro_batch_size, dp_rank, dp_size, seed,
                             consumed_samples // step, slots)
        if self.num_workers:
            stream = torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, prefetch_factor=4,
                pin_memory=cuda_available())
        for batch, (slot, skipped) in stream:
            self.skipped[(dp_rank, slot)] = skipped
            yield batch


def _text_model(manifest: Manifest, override: str | None) -> bytes | None:
    """The caption tokenizer's bytes, checked against the manifest's fingerprint and size."""
    if manifest.condition != "text":
        return None
    path = override or manifest.text_model_path()
    if not os.path.exists(path):
        raise SystemExit(f"error: sentencepiece model {path} (of {manifest.path}) not found")
    expected = manifest.text_tokenizer.fingerprint
    if fingerprint_file(path) != expected:
        raise SystemExit(f"error: sentencepiece model {path} has fingerprint "
                         f"{fingerprint_file(path)} but {manifest.path} expects {expected}")
    with open(path, "rb") as f:
        proto = f.read()
    size = sentencepiece.SentencePieceProcessor(model_proto=proto).get_piece_size()
    if size != manifest.text_tokenizer.vocab_size:
        raise SystemExit(f"error: sentencepiece model {path} has {size} pieces but "
                         f"{manifest.path} says {manifest.text_tokenizer.vocab_size}")
    return proto


def _check_flags(args: argparse.Namespace) -> None:
    if not args.data_path:
        raise SystemExit("error: --dataset video-wds needs --data-path")
    if not 0.0 <= args.null_condition_prob <= 1.0:
        raise SystemExit(f"error: --null-condition-prob {args.null_condition_prob} is not in "
                         f"[0, 1]")
    if not 0.0 <= args.max_bad_sample_fraction < 1.0:
        raise SystemExit(f"error: --max-bad-sample-fraction {args.max_bad_sample_fraction} is "
                         f"not in [0, 1)")
    if args.data_num_workers < 0 or args.data_shuffle_buffer < 1:
        raise SystemExit("error: --data-num-workers must be >= 0 and --data-shuffle-buffer "
                         ">= 1")


@register("dataset", "video-wds")
def video_wds(args: argparse.Namespace) -> VideoTokenSource:
    """Train (and valid) shards from ``--data-path``/``--valid-data-path``; see the docs."""
    _check_flags(args)
    train, manifests = resolve_components(args.data_path)
    valid, valid_manifests = (resolve_components(args.valid_data_path)
                              if args.valid_data_path else (None, []))
    check_compatible(manifests + valid_manifests)
    manifest = with_overrides(manifests[0], args.data_condition, args.max_text_tokens)
    text_model = _text_model(manifest, args.text_tokenizer_model)

    def source(components: list[Component], null_prob: float) -> WebDatasetSource:
        config = LoaderConfig(tuple(components), manifest, text_model, null_prob,
                              args.max_bad_sample_fraction, args.data_shuffle_buffer)
        return WebDatasetSource(config, args.data_num_workers)

    for component in train + (valid or []):
        log.info("video-wds: %s: %d shards, %d samples, weight %g", component.spec,
                 len(component.shards), component.num_samples, component.weight)
    return VideoTokenSource(
        vocab=manifest.vocab,
        layout=manifest.layout,
        train=source(train, args.null_condition_prob),
        valid=source(valid, 0.0) if valid else None,  # validate on the true conditions
        info={"manifest": manifest, "manifests": manifests + valid_manifests},
    )
