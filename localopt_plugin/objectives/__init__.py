"""Training objectives (registered kind ``objective``) and the window samplers they use.

* ``full-sequence``: next-token loss on every video token (the baseline).
* ``local-opt``: Local Optimization, loss on one window of frames; earlier frames are context
  run without autograd, later frames are not computed.
* ``fewer-frames``: the naive baseline, a W-frame clip trained with no earlier context.
"""

from localopt_plugin.objectives import window_sampler  # noqa: F401  (registers samplers)
from localopt_plugin.objectives.base import ObjectiveOutput
from localopt_plugin.objectives.sequence import FewerFrames, FullSequence, LocalOptimization

__all__ = ["FewerFrames", "FullSequence", "LocalOptimization", "ObjectiveOutput"]
