"""Evaluating checkpoints and generated videos (``localopt-eval``): NLL per frame position,
optical-flow temporal consistency, FVD, and on the embedded data the shipped classifier's class
accuracy and Frechet distance; see docs/generation-evaluation.md."""

from localopt_plugin.evaluation.classifier import class_report, classify_videos

__all__ = ["class_report", "classify_videos"]
