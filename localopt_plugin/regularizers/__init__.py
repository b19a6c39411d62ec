"""Regularizers (registered kind ``regularizer``), added to an objective's loss.

* ``reco``: ReCo, Representation Continuity (``--reco-*`` flags).
"""

from localopt_plugin.regularizers.reco import ReCo, reco_penalty

__all__ = ["ReCo", "reco_penalty"]
