"""What every objective returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ObjectiveOutput:
    """loss: mean cross-entropy over the optimized video tokens.

    hidden: final hidden states ``[s, b, h]`` of the optimized positions (frames x tokens in
    raster order), which regularizers such as ReCo act on.
    """

    loss: torch.Tensor
    hidden: torch.Tensor
    num_tokens: int
    first_frame: int
    num_frames: int
    metrics: dict[str, float] = field(default_factory=dict)
