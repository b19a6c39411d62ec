"""The ``video-wds`` dataset as named stages, in webdataset's style.

=========  ==========================================================================
stage      module
=========  ==========================================================================
shards     :mod:`.shards`: ``--data-path`` specs (paths, brace ranges, globs, blends)
           -> components -> each (rank, worker) slot's shards per epoch
read,      :mod:`.samples`: tar members -> decoded, validated samples; bad ones are
decode     skipped and counted by reason
shuffle,   :mod:`.blend`: a slot's epochs (buffer shuffle, top-up to equal shares) and
blend      the weighted blend with null-condition drops
batch      :mod:`.batch`: model inputs (:mod:`localopt_plugin.data.inputs`), micro-batches
=========  ==========================================================================

:mod:`.dataset` holds the flags and registers ``video-wds``.
"""

from localopt_plugin.data.wds.dataset import VideoWdsConfig, WebDatasetSource, video_wds

__all__ = ["VideoWdsConfig", "WebDatasetSource", "video_wds"]
