"""Small models and flag sets for the tests, from the package's presets and parsers."""

from __future__ import annotations

import argparse
import dataclasses

from localopt_plugin.model import ModelConfig

# The LayerNorm / GELU / learned-positions / tied-embeddings model that the plain-PyTorch
# reference also covers in its simplest form; the shipped architecture is preset "test".
TINY_MODEL_FLAGS = (
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--hidden-dropout", "0", "--attention-dropout", "0",
)
TINY_DATA_FLAGS = (
    "--synthetic-frames", "4", "--synthetic-frame-tokens", "16",
    "--synthetic-codebook-size", "64", "--synthetic-num-classes", "4",
)
# A tiny synthetic-data training run shared by the multi-process tests (6 iterations, 2 layers).
TINY_TRAIN_FLAGS = (
    *TINY_MODEL_FLAGS,
    "--synthetic-frames", "3", "--synthetic-frame-tokens", "16",
    "--synthetic-codebook-size", "64", "--synthetic-num-classes", "4",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6",
    "--lr", "1e-3", "--lr-warmup-iters", "2", "--log-interval", "1",
)
# The same run with the shipped presets' architecture (RoPE, RMSNorm, SwiGLU, no bias, untied,
# GQA): the model of preset "test".
PRESET_TRAIN_FLAGS = ("--preset", "test", *TINY_TRAIN_FLAGS[len(TINY_MODEL_FLAGS):])


def train_args(*flags: str) -> argparse.Namespace:
    """``localopt-train``'s parsed flags (``--preset`` applied)."""
    from localopt_plugin.commands.train import build_parser
    from localopt_plugin.model.presets import apply_preset

    parser = build_parser()
    apply_preset(parser, list(flags))
    return parser.parse_args(list(flags))


def tiny_args(*extra: str) -> argparse.Namespace:
    """Parsed trainer flags for a small, dropout-free model."""
    args = train_args(*TINY_MODEL_FLAGS, *TINY_DATA_FLAGS, *extra)
    args.max_position_embeddings = args.max_position_embeddings or 256
    return args


def tiny_model(*extra: str) -> ModelConfig:
    """The ModelConfig of ``tiny_args(*extra)``."""
    return ModelConfig.from_args(tiny_args(*extra))


def preset_model(name: str = "test", **overrides) -> ModelConfig:
    """A preset's ModelConfig with room for 256 positions."""
    from localopt_plugin.model.presets import preset_config

    return dataclasses.replace(preset_config(name, max_position_embeddings=256), **overrides)
