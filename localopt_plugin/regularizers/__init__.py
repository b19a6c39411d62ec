"""Regularizers (registered kind ``regularizer``), added to an objective's loss.

* ``reco``: ReCo, Representation Continuity (``--reco-*`` flags).
"""

from __future__ import annotations

import torch

from localopt_plugin.plan import ObjectiveOutput
from localopt_plugin.regularizers.reco import ReCo, ReCoConfig, reco_penalty

__all__ = ["ReCo", "ReCoConfig", "apply_regularizers", "reco_penalty"]


def apply_regularizers(out: ObjectiveOutput, regularizers,
                       iteration: int) -> tuple[torch.Tensor, dict]:
    """The objective's loss plus every regularizer's, and the regularizers' metrics.

    One place for the sum that the DeepSpeed trainer, the pipeline's loss function and the
    Megatron-LM loss function all compute.
    """
    total, metrics = out.loss, {}
    for regularizer in regularizers:
        reg_loss, reg_metrics = regularizer(out, iteration)
        total = total + reg_loss
        metrics.update(reg_metrics)
    return total, metrics
