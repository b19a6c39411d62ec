"""The token layout of one training sample and the shared id space.

A sample is ``[BOS, condition..., BOV, frame 0 tokens, ..., frame F-1 tokens, EOV]``: frames of
``frame_tokens`` ids each in raster order. Video ids occupy ``[0, video_vocab_size)``; special
and condition ids follow them in one vocabulary: BOS, BOV, EOV, the null condition, the class
ids and, for caption-conditioned data, a pad id and the text tokenizer's ids.

Megatron's convention is used for next-token prediction: inputs are ``tokens[:-1]`` and labels
``tokens[1:]``, so the label of input position ``t`` is ``tokens[t + 1]``. The input positions
whose labels are the video tokens of frames ``[a, b)`` are ``[video_start - 1 + a*P,
video_start - 1 + b*P)``; ``video_start - 1`` input positions (BOS and the condition) precede
them and carry no loss.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Vocabulary:
    """One id space for video tokens, special tokens, class conditions and text tokens.

    Text ids (``text_vocab_size`` > 0) come last, so a vocabulary without them keeps every id
    and its size.
    """

    video_vocab_size: int
    num_classes: int = 0
    text_vocab_size: int = 0

    @property
    def bos(self) -> int:
        return self.video_vocab_size

    @property
    def bov(self) -> int:
        return self.video_vocab_size + 1

    @property
    def eov(self) -> int:
        return self.video_vocab_size + 2

    @property
    def null_condition(self) -> int:
        """Condition id for classifier-free guidance's unconditional branch."""
        return self.video_vocab_size + 3

    def class_token(self, label: int) -> int:
        if not 0 <= label < self.num_classes:
            raise ValueError(f"class label {label} outside [0, {self.num_classes})")
        return self.video_vocab_size + 4 + label

    @property
    def pad(self) -> int:
        """Pads captions to a fixed length (only with text ids; no loss is taken on it)."""
        if not self.text_vocab_size:
            raise ValueError("a vocabulary without text ids has no pad id")
        return self.video_vocab_size + 4 + self.num_classes

    def text_token(self, piece: int) -> int:
        """The shared id of the text tokenizer's id ``piece``."""
        if not 0 <= piece < self.text_vocab_size:
            raise ValueError(f"text token {piece} outside [0, {self.text_vocab_size})")
        return self.pad + 1 + piece

    @property
    def size(self) -> int:
        text = 1 + self.text_vocab_size if self.text_vocab_size else 0  # pad + text ids
        return self.video_vocab_size + 4 + self.num_classes + text


@dataclass(frozen=True)
class SampleLayout:
    """Where the frames sit in a sample's token sequence (identical for every sample)."""

    video_start: int  # index of the first frame token (after BOS, condition, BOV)
    num_frames: int
    frame_tokens: int

    @property
    def seq_length(self) -> int:
        """Tokens per sample, EOV included."""
        return self.video_start + self.num_frames * self.frame_tokens + 1

    @property
    def input_length(self) -> int:
        """Model input length: the sample minus its last token."""
        return self.seq_length - 1

    @property
    def prefix_length(self) -> int:
        """Input positions before the first one whose label is a video token."""
        return self.video_start - 1

    def label_span(self, first_frame: int, num_frames: int) -> tuple[int, int]:
        """Input positions ``[start, end)`` whose labels are frames ``[first, first + num)``."""
        start = self.prefix_length + first_frame * self.frame_tokens
        return start, start + num_frames * self.frame_tokens
