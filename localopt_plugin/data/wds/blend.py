"""Stages 4 and 5, shuffle and blend: one slot's endless sample stream over the components.

A slot ``(rank, worker)`` takes exactly ``Q = ceil(N / (R*W))`` samples of a component per
epoch (``N``: the manifest's count): it reads its shards in their epoch order, shuffles the good
samples with webdataset's buffer shuffle seeded by ``(seed, component, rank, worker, epoch)``,
and tops up from shards drawn by a seeded generator when it reads fewer (fewer shards, bad
samples), or stops early when it reads more. So every rank yields the same number of batches
(no DDP hang), and epoch boundaries sit at known positions. Sample ``i`` of a slot comes from
the component drawn for ``i`` with the blend weights, and becomes unconditional with
``--null-condition-prob``; both draws come from generators seeded by ``(seed, rank, worker,
i // 4096)``, so a resumed slot replays them without reading anything.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator

import numpy as np
import webdataset as wds

from localopt_plugin.data.wds.samples import Sample, SkipCounter, read_shard
from localopt_plugin.data.wds.shards import DRAWS, SAMPLE_ORDER, TOP_UP, derived_seed, slot_shards

BLOCK = 4096  # slot samples per block of blend/null-condition draws


class SlotReader:
    """Slot ``(rank, worker)`` of a loader: its samples in order, bad ones skipped and counted.

    ``config`` is the loader's ``LoaderConfig`` (components, manifest, limits).
    """

    def __init__(self, config, seed: int, rank: int, dp_size: int, worker: int,
                 num_workers: int) -> None:
        self.config, self.seed = config, seed
        self.rank, self.dp_size, self.worker, self.num_workers = rank, dp_size, worker, num_workers
        slots = dp_size * num_workers
        self.quotas = [math.ceil(c.num_samples / slots) for c in config.components]
        weights = np.array([c.weight for c in config.components], dtype=np.float64)
        self.cum_weights = np.cumsum(weights / weights.sum())[:-1]
        self.counter = SkipCounter(f"data-parallel rank {rank}, loader worker {worker}",
                                   config.max_bad_fraction, sum(self.quotas))

    def _shard(self, shard) -> Iterator[Sample]:
        return read_shard(shard, self.config.manifest, self.counter)

    def _top_up(self, c: int, epoch: int) -> Iterator[Sample]:
        """Endless samples of shards drawn by size: fills a slot short of its epoch share."""
        rng = random.Random(derived_seed(self.seed, TOP_UP, c, self.rank, self.worker, epoch))
        shards = self.config.components[c].shards
        sizes = [s.samples for s in shards]
        while True:
            yield from self._shard(rng.choices(shards, weights=sizes)[0])

    def _epoch(self, c: int, epoch: int) -> Iterator[Sample]:
        """Exactly the slot's quota of component ``c`` for one epoch."""
        mine = slot_shards(self.config.components[c], c, epoch, self.seed, self.rank,
                           self.dp_size, self.worker, self.num_workers)
        read = (sample for shard in mine for sample in self._shard(shard))
        rng = random.Random(derived_seed(self.seed, SAMPLE_ORDER, c, self.rank, self.worker,
                                         epoch))
        buffer = self.config.shuffle_buffer
        shuffled = wds.shuffle(buffer, buffer, rng=rng)(read)
        return itertools.islice(itertools.chain(shuffled, self._top_up(c, epoch)),
                                self.quotas[c])

    def _component(self, c: int, start: int) -> Iterator[Sample]:
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
        rng = np.random.default_rng([self.seed, DRAWS, self.rank, self.worker, block])
        components = np.searchsorted(self.cum_weights, rng.random(BLOCK), side="right")
        return components, rng.random(BLOCK) < self.config.null_condition_prob

    def samples(self, start: int) -> Iterator[tuple[Sample, bool]]:
        """``(sample, use the null condition)`` from slot index ``start`` on."""
        n = len(self.config.components)
        first_block, within = divmod(start, BLOCK)
        consumed = np.zeros(n, dtype=np.int64)
        for block in range(first_block):
            consumed += np.bincount(self._draws(block)[0], minlength=n)
        consumed += np.bincount(self._draws(first_block)[0][:within], minlength=n)
        streams = [self._component(c, int(consumed[c])) for c in range(n)]
        for block in itertools.count(first_block):
            components, nulls = self._draws(block)
            for i in range(within if block == first_block else 0, BLOCK):
                yield next(streams[components[i]]), bool(nulls[i])
