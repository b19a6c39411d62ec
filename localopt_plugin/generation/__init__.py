"""Sampling videos from trained checkpoints (``localopt-generate``); see
docs/generation-evaluation.md."""

from localopt_plugin.generation.sampling import (
    SamplingConfig,
    sample_continuation,
    sample_video_tokens,
)

__all__ = ["SamplingConfig", "sample_continuation", "sample_video_tokens"]
