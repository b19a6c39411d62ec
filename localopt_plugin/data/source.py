"""What a registered dataset returns, and the deterministic, resumable batch stream over it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from localopt_plugin.data.layout import SampleLayout, Vocabulary


@dataclass
class VideoTokenSource:
    """A dataset's vocabulary, sample layout and train/valid splits (map-style datasets)."""

    vocab: Vocabulary
    layout: SampleLayout
    train: torch.utils.data.Dataset
    valid: torch.utils.data.Dataset | None = None


def batch_stream(
    dataset: torch.utils.data.Dataset,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    consumed_samples: int = 0,
    num_workers: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches for one data-parallel rank, starting after ``consumed_samples``.

    Every epoch is a seeded permutation split across ranks (rank r takes every dp_size-th
    micro-batch slot), so each global batch is the same whatever the data-parallel layout, and
    resuming from ``consumed_samples`` (a multiple of the global micro-batch) continues exactly.
    """
    step = micro_batch_size * dp_size
    n = len(dataset)
    usable = n - n % step
    if usable == 0:
        raise ValueError(f"dataset of {n} samples is smaller than one global micro-batch ({step})")
    if consumed_samples % step:
        raise ValueError(f"consumed samples {consumed_samples} is not a multiple of {step}")
    epoch, offset = divmod(consumed_samples, usable)
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))[:usable]
        indices = [
            order[i + dp_rank * micro_batch_size: i + (dp_rank + 1) * micro_batch_size].tolist()
            for i in range(offset, usable, step)
        ]
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=indices, num_workers=num_workers,
            persistent_workers=False,
        )
        yield from loader
        epoch, offset = epoch + 1, 0
