"""Evaluating checkpoints and generated videos (``localopt-eval``): NLL per frame position,
optical-flow temporal consistency and FVD; see docs/generation-evaluation.md."""
