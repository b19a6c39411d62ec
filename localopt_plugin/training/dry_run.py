"""``--dry-run``: everything a launch script decides, checked without a model or data."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from localopt_plugin.model.gpt import padded_vocab_size
from localopt_plugin.training.ds_config import build_deepspeed_config


def parameter_count(args: argparse.Namespace, vocab_size: int) -> int:
    """GPT parameters from the flags (Megatron's layout: fused QKV, biases, two norms/layer)."""
    h, layers = args.hidden_size, args.num_layers
    ffn = args.ffn_hidden_size or 4 * h
    heads = args.num_attention_heads
    head_dim = args.kv_channels or h // heads
    groups = args.num_query_groups if args.group_query_attention else heads
    bias = 0 if args.disable_bias_linear else 1
    qkv = h * head_dim * (heads + 2 * groups) + bias * head_dim * (heads + 2 * groups)
    proj = heads * head_dim * h + bias * h
    fc1 = h * ffn * (2 if args.swiglu else 1) + bias * ffn * (2 if args.swiglu else 1)
    fc2 = ffn * h + bias * h
    norms = 2 * h * (1 if args.normalization == "RMSNorm" else 2)
    per_layer = qkv + proj + fc1 + fc2 + norms
    vocab = padded_vocab_size(vocab_size, args.make_vocab_size_divisible_by,
                              args.tensor_model_parallel_size)
    embeddings = vocab * h * (1 if not args.untie_embeddings_and_output_weights else 2)
    positions = (args.max_position_embeddings or args.seq_length or 0) * h if (
        args.position_embedding_type == "learned_absolute") else 0
    final_norm = h * (1 if args.normalization == "RMSNorm" else 2)
    return layers * per_layer + embeddings + positions + final_norm


def describe(args: argparse.Namespace) -> dict:
    """Validate what can be validated without processes, a model or shards; summarise it."""
    from localopt_plugin.objectives.sequence import build_objective
    from localopt_plugin.training.trainer import prepare_data

    source = prepare_data(args)  # reads manifests, not shards
    build_objective(args, source.layout)  # window settings against the video length
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if world % model_parallel:
        raise SystemExit(f"error: world size {world} is not divisible by tensor x pipeline "
                         f"parallel size {model_parallel}")
    dp = world // model_parallel
    ds_config = build_deepspeed_config(args, dp)
    summary = {
        "world size": world,
        "parallel layout (tp, pp, dp)": [args.tensor_model_parallel_size,
                                         args.pipeline_model_parallel_size, dp],
        "objective": args.objective,
        "regularizers": args.regularizer,
        "dataset": args.dataset,
        "sample layout": dataclasses.asdict(source.layout),
        "vocabulary": source.vocab.size,
        "seq length": args.seq_length,
        "parameters": parameter_count(args, source.vocab.size),
        "deepspeed": ds_config,
    }
    return summary


def main(args: argparse.Namespace) -> int:
    print(json.dumps(describe(args), indent=2, default=str))
    return 0
