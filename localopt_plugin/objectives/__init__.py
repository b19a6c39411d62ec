"""Training objectives (registered kind ``objective``) and the window samplers they use.

* ``full-sequence``: next-token loss on every video token (the baseline).
* ``local-opt``: Local Optimization, loss on one window of frames; earlier frames are context
  run without autograd, later frames are not computed.
* ``fewer-frames``: the naive baseline, a W-frame clip trained with no earlier context.
"""

from __future__ import annotations

from localopt_plugin import registry
from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.objectives.sequence import (
    FewerFrames,
    FullSequence,
    LocalOptConfig,
    LocalOptimization,
    Objective,
)
from localopt_plugin.objectives.window_sampler import (
    WindowConfig,
    WindowSampler,
    global_micro_batch,
)

__all__ = ["FewerFrames", "FullSequence", "LocalOptConfig", "LocalOptimization", "Objective",
           "WindowConfig", "WindowSampler", "build_objective", "global_micro_batch"]


def build_objective(name: str, layout: SampleLayout, *, sampler: str = "first-frame-balanced",
                    window: WindowConfig | None = None, config=None, seed: int = 1234):
    """The registered objective ``name``; windowed ones get the registered window sampler
    ``sampler`` configured by ``window``. Raises ValueError on settings the layout cannot
    take (e.g. a window longer than the video)."""
    def windows() -> WindowSampler:
        return registry.build("window_sampler", sampler, window or WindowConfig(),
                              num_frames=layout.num_frames, seed=seed)

    return registry.build("objective", name, config, layout=layout, windows=windows)
