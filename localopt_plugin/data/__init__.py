"""Data: sample layout and vocabulary, model inputs, registered datasets, the batch stream.

* :mod:`.layout`: where frames sit in a sample, the shared id space;
* :mod:`.inputs`: a sample's token sequence (``[BOS, condition, BOV, frames, EOV]``);
* :mod:`.source`: what a dataset returns, the resumable map-style stream;
* :mod:`.wds`: where a shard is read (``video-wds``), as named stages;
* :mod:`.synthetic`, :mod:`.recall_tokens`, :mod:`.procedural`: built-in token and RGB data;
  :mod:`.manifest`.
"""

from localopt_plugin.data import (
    recall_tokens,  # noqa: F401  (registers recall-tokens)
    synthetic,  # noqa: F401  (registers synthetic-video-tokens)
    wds,  # noqa: F401  (registers video-wds)
)
from localopt_plugin.data.layout import SampleLayout, Vocabulary
from localopt_plugin.data.source import BatchSource, MapStyleSource, VideoTokenSource

__all__ = ["BatchSource", "MapStyleSource", "SampleLayout", "VideoTokenSource", "Vocabulary"]
