"""Stage 6, batch: one rank's micro-batches; each DataLoader worker runs one slot.

Slot ``w`` yields micro-batches of consecutive samples, and the DataLoader takes workers
round-robin, so micro-batch ``k`` of a rank is micro-batch ``k // W`` of slot ``k % W``.
Resuming after ``k`` micro-batches makes worker ``d`` play slot ``(d + k) % W`` and skip that
slot's consumed samples. Every batch carries its slot's skip counts, which the main process
keeps (:class:`~localopt_plugin.data.wds.dataset.WebDatasetSource` ``.skipped``).
"""

from __future__ import annotations

import itertools

import sentencepiece
import torch

from localopt_plugin.data.inputs import InputBuilder, collate
from localopt_plugin.data.wds.blend import SlotReader


class RankStream(torch.utils.data.IterableDataset):
    """One rank's micro-batches as ``(batch, (slot, skip counts))``."""

    def __init__(self, config, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, consumed_micro_batches: int, num_slots: int) -> None:
        self.config, self.micro_batch_size = config, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed, self.num_slots = consumed_micro_batches, num_slots

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        slot = ((info.id if info else 0) + self.consumed) % self.num_slots
        done = len(range(slot, self.consumed, self.num_slots))  # its micro-batches consumed
        reader = SlotReader(self.config, self.seed, self.dp_rank, self.dp_size, slot,
                            self.num_slots)
        manifest = self.config.manifest
        text = (sentencepiece.SentencePieceProcessor(model_proto=self.config.text_model)
                if manifest.condition == "text" else None)
        build = InputBuilder(manifest.vocab, manifest.layout, text)
        samples = reader.samples(done * self.micro_batch_size)
        while True:
            drawn = list(itertools.islice(samples, self.micro_batch_size))
            batch = collate(
                [build(s.tokens, s.label, s.caption, null) for s, null in drawn],
                manifest.layout,
                label=torch.tensor([s.label for s, _ in drawn]),
                null_condition=torch.tensor([null for _, null in drawn]),
                keys=[s.key for s, _ in drawn])
            yield batch, (slot, dict(reader.counter.bad))
