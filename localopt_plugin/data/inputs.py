"""Model inputs from video tokens and a condition: ``[BOS, condition..., BOV, frames..., EOV]``.

One place for it because the loader and generation must build conditions identically (a
caption tokenized at generation time must match how training saw it).
"""

from __future__ import annotations

import numpy as np
import torch

from localopt_plugin.data.layout import SampleLayout, Vocabulary


def caption_ids(processor, caption: str, vocab: Vocabulary, length: int) -> np.ndarray:
    """Caption pieces truncated to ``length``, shifted into the shared id space, then padded."""
    pieces = processor.encode(caption, out_type=int)[:length]
    ids = np.full(length, vocab.pad, dtype=np.int64)
    ids[: len(pieces)] = np.asarray(pieces, dtype=np.int64) + vocab.text_token(0)
    return ids


def null_condition(vocab: Vocabulary, layout: SampleLayout) -> np.ndarray:
    """The unconditional condition's ids: ``[null]``, or ``[null, pad, ...]`` (a fixed-length
    null caption) for captions. The loader's condition drops, classifier-free guidance and the
    NLL condition check must all use the same ids."""
    ids = np.full(layout.video_start - 2, vocab.null_condition, dtype=np.int64)
    if vocab.text_vocab_size:
        ids[1:] = vocab.pad
    return ids


class InputBuilder:
    """Token sequences of samples in the shared id space.

    ``text_processor``: the captions' sentencepiece processor for caption-conditioned data
    (None for class labels).
    """

    def __init__(self, vocab: Vocabulary, layout: SampleLayout, text_processor=None) -> None:
        self.vocab, self.layout, self.text = vocab, layout, text_processor
        self.null = null_condition(vocab, layout)

    def condition(self, label: int, caption: str | None, null: bool) -> np.ndarray:
        """Condition ids of a class label or caption (the null condition when ``null``)."""
        if null:
            return self.null
        if self.text is None:
            return np.array([self.vocab.class_token(label)], dtype=np.int64)
        return caption_ids(self.text, caption, self.vocab, self.null.size)

    def __call__(self, tokens: np.ndarray, label: int, caption: str | None,
                 null: bool = False) -> np.ndarray:
        layout, vocab = self.layout, self.vocab
        out = np.empty(layout.seq_length, dtype=np.int64)
        out[0], out[layout.video_start - 1], out[-1] = vocab.bos, vocab.bov, vocab.eov
        out[1: layout.video_start - 1] = self.condition(label, caption, null)
        out[layout.video_start: -1] = tokens.reshape(-1)
        return out


def collate(sequences: list[np.ndarray], layout: SampleLayout, **extra) -> dict:
    """A micro-batch: Megatron's names, the full ``tokens`` the plugin's objectives use, and
    ``extra`` per-sample fields (tensors or lists)."""
    batch = torch.from_numpy(np.stack(sequences))
    size, inputs = batch.shape[0], layout.input_length
    loss_mask = torch.zeros(size, inputs)
    loss_mask[:, slice(*layout.label_span(0, layout.num_frames))] = 1.0
    return {
        "tokens": batch,
        "labels": batch[:, 1:].clone(),
        "loss_mask": loss_mask,  # 1 where the label is a video token
        "position_ids": torch.arange(inputs).repeat(size, 1),
        **extra,
    }
