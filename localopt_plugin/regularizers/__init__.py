"""Regularizers (registered kind ``regularizer``), added to an objective's loss."""
