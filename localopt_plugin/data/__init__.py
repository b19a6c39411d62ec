"""Data: sample layout and vocabulary, registered datasets, the resumable batch stream."""

from localopt_plugin.data import (
    synthetic,  # noqa: F401  (registers synthetic-video-tokens)
    webdataset_source,  # noqa: F401  (registers video-wds)
)
from localopt_plugin.data.layout import SampleLayout, Vocabulary
from localopt_plugin.data.source import BatchSource, MapStyleSource, VideoTokenSource

__all__ = ["BatchSource", "MapStyleSource", "SampleLayout", "VideoTokenSource", "Vocabulary"]
