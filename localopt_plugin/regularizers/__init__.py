"""Regularizers (registered kind ``regularizer``), added to an objective's loss.

* ``reco``: ReCo, Representation Continuity (``--reco-*`` flags).
"""

from __future__ import annotations

import torch

from localopt_plugin.metric_names import LM_LOSS, TOTAL_LOSS
from localopt_plugin.plan import ObjectiveOutput
from localopt_plugin.regularizers.reco import ReCo, ReCoConfig, reco_penalty

__all__ = ["ReCo", "ReCoConfig", "apply_regularizers", "reco_penalty"]


def apply_regularizers(out: ObjectiveOutput, regularizers,
                       iteration: int) -> tuple[torch.Tensor, dict]:
    """The total loss (the objective's plus every regularizer's) and the step's metrics: LM
    loss, the objective's and regularizers' own, total loss (detached).

    One place for what the DeepSpeed trainer, the DeepSpeed pipeline's loss function and the
    Megatron-LM loss function all compute.
    Under context or sequence parallelism the losses are this rank's shares (their gradients
    sum over the ranks) and the metrics the whole values.
    """
    total, metrics = out.loss, {LM_LOSS: out.lm_loss(), **out.metrics}
    whole_total = metrics[LM_LOSS]
    for regularizer in regularizers:
        reg_loss, reg_metrics = regularizer(out, iteration)
        total = total + reg_loss
        whole_total = whole_total + out.whole(reg_loss)
        metrics.update(reg_metrics)
    metrics[TOTAL_LOSS] = whole_total
    return total, metrics
