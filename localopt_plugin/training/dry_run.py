"""``--dry-run``: everything a launch script decides, checked without a model or data."""

from __future__ import annotations

import dataclasses

from localopt_plugin.data.source import VideoTokenSource
from localopt_plugin.model import ModelConfig, padded_vocab_size
from localopt_plugin.training.config import TrainConfig


def parameter_count(model: ModelConfig, vocab_size: int, tensor_parallel: int,
                    seq_length: int) -> int:
    """GPT parameters from the config (Megatron's layout: fused QKV, biases, two norms/layer)."""
    h, layers = model.hidden_size, model.num_layers
    ffn = model.ffn_hidden_size or 4 * h
    heads = model.num_attention_heads
    head_dim = model.kv_channels or h // heads
    groups = model.query_groups
    bias = 0 if model.disable_bias_linear else 1
    qkv = h * head_dim * (heads + 2 * groups) + bias * head_dim * (heads + 2 * groups)
    proj = heads * head_dim * h + bias * h
    fc1 = h * ffn * (2 if model.swiglu else 1) + bias * ffn * (2 if model.swiglu else 1)
    fc2 = ffn * h + bias * h
    norms = 2 * h * (1 if model.normalization == "RMSNorm" else 2)
    per_layer = qkv + proj + fc1 + fc2 + norms
    vocab = padded_vocab_size(vocab_size, model.make_vocab_size_divisible_by, tensor_parallel)
    embeddings = vocab * h * (2 if model.untie_embeddings_and_output_weights else 1)
    positions = (model.max_position_embeddings or seq_length) * h if (
        model.position_embedding_type == "learned_absolute") else 0
    final_norm = h * (1 if model.normalization == "RMSNorm" else 2)
    return layers * per_layer + embeddings + positions + final_norm


def describe(config: TrainConfig, source: VideoTokenSource, world_size: int) -> dict:
    """What the run would do, from its resolved configuration."""
    parallel = config.parallel
    return {
        "world size": world_size,
        "parallel layout (tp, pp, dp)": [parallel.tensor_model_parallel_size,
                                         parallel.pipeline_model_parallel_size,
                                         config.data_parallel_size],
        "objective": config.objective,
        "window": dataclasses.asdict(config.window),
        "regularizers": [name for name, _ in config.regularizers],
        "dataset": config.dataset,
        "sample layout": dataclasses.asdict(source.layout),
        "vocabulary": source.vocab.size,
        "seq length": config.seq_length,
        "micro batch, global batch, accumulation": [config.micro_batch_size,
                                                    config.global_batch_size,
                                                    config.gradient_accumulation_steps],
        "parameters": parameter_count(config.model, source.vocab.size,
                                      parallel.tensor_model_parallel_size, config.seq_length),
        "recomputation": config.model.recompute_granularity,
        "deepspeed": config.deepspeed.config,
        "deepspeed notes": config.deepspeed.notes,
    }
