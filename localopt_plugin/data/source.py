"""What a registered dataset returns, and the deterministic, resumable batch stream.

A dataset factory (registered kind ``dataset``, called with ``args``) returns a
:class:`VideoTokenSource`: the vocabulary, the sample layout and, per split, a
:class:`BatchSource` whose ``batches(...)`` yields micro-batches for one data-parallel rank
starting after ``consumed_samples`` global samples, so that a resumed run continues exactly.
Micro-batches are dicts with ``tokens`` (``[b, seq_length]`` int64 ids, see
:mod:`localopt_plugin.data.layout`) and whatever else the dataset adds (``label`` ...).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from localopt_plugin.data.layout import SampleLayout, Vocabulary


class BatchSource(Protocol):
    def batches(self, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                consumed_samples: int = 0) -> Iterator[dict[str, torch.Tensor]]: ...


@dataclass
class VideoTokenSource:
    """A dataset's vocabulary, sample layout and train/valid batch sources."""

    vocab: Vocabulary
    layout: SampleLayout
    train: BatchSource
    valid: BatchSource | None = None
    info: dict = field(default_factory=dict)  # e.g. the manifest, for logs and checks


@dataclass
class MapStyleSource:
    """A BatchSource over a map-style dataset: seeded permutations split across ranks."""

    dataset: torch.utils.data.Dataset
    num_workers: int = 0

    def batches(self, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                consumed_samples: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless micro-batches; rank r takes every dp_size-th micro-batch slot of an epoch.

        Each global batch is therefore the same whatever the data-parallel layout, and resuming
        from ``consumed_samples`` (a multiple of the global micro-batch) continues exactly.
        """
        step = micro_batch_size * dp_size
        n = len(self.dataset)
        usable = n - n % step
        if usable == 0:
            raise ValueError(f"dataset of {n} samples is smaller than one global micro-batch "
                             f"({step})")
        if consumed_samples % step:
            raise ValueError(f"consumed samples {consumed_samples} is not a multiple of {step}")
        epoch, offset = divmod(consumed_samples, usable)
        while True:
            generator = torch.Generator().manual_seed(seed + epoch)
            order = torch.randperm(n, generator=generator)[:usable]
            indices = [
                order[i + dp_rank * micro_batch_size: i + (dp_rank + 1) * micro_batch_size]
                .tolist()
                for i in range(offset, usable, step)
            ]
            # its own generator: creating the loader must not advance the global RNG, which
            # dropout uses (a resumed run would otherwise draw different masks)
            yield from torch.utils.data.DataLoader(self.dataset, batch_sampler=indices,
                                                   num_workers=self.num_workers,
                                                   generator=torch.Generator())
            epoch, offset = epoch + 1, 0
