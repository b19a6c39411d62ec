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


def architecture(model: ModelConfig) -> dict:
    """The model the flags build (after aliases and Megatron's defaults)."""
    return {
        "layers": model.num_layers, "hidden": model.hidden_size,
        "ffn hidden": model.ffn_hidden_size, "ffn": "SwiGLU" if model.swiglu else "GELU",
        "attention heads": model.num_attention_heads, "query groups": model.query_groups,
        "position embedding": model.position_embedding_type + (
            f" (rotary percent {model.rotary_percent})" if model.position_embedding_type == "rope"
            and model.rotary_percent != 1.0 else ""),
        "normalization": model.normalization,
        "output layer": "untied" if model.untie_embeddings_and_output_weights else "tied",
    }


def evaluation(config: TrainConfig, source) -> str | dict:
    """When and on how much the run evaluates (Megatron's meaning of the flags)."""
    run = config.run
    if not run.eval_interval:
        return "off (no --eval-interval)"
    if source.valid is None:
        return "off (no validation data: --valid-data-path)"
    return {"every iterations": run.eval_interval, "global batches": run.eval_iters,
            "samples": run.eval_iters * config.global_batch_size}


def schedule(config: TrainConfig) -> dict:
    """Optimizer, iterations and the LR schedule in iterations (what the scheduler is given)."""
    opt, ds, run = config.optimizer, config.deepspeed, config.run
    if ds.json_optimizer:
        optimizer = f"DeepSpeed's {ds.config['optimizer'].get('type')} (JSON)"
    elif ds.offload_optimizer:
        optimizer = "DeepSpeed CPU Adam (AdamW, ZeRO-Offload)"
    elif opt.cpu_optimizer:
        optimizer = "DeepSpeed CPU Adam (AdamW, --cpu-optimizer)"
    else:
        optimizer = {"adam": "AdamW", "sgd": "SGD"}[opt.optimizer]
    out = {"optimizer": optimizer, "train iters": run.train_iters}
    if run.exit_interval:  # Megatron-LM stops (after saving) at the first multiple of it
        out["exit interval"] = run.exit_interval
    if run.train_samples is not None:
        out["train samples"] = run.train_samples
    if run.train_tokens is not None:
        out["train tokens"] = run.train_tokens
    if ds.json_scheduler:
        out["lr schedule"] = f"DeepSpeed's {ds.config['scheduler'].get('type')} (JSON)"
    else:
        peak, warmup, decay, wsd = config.lr_schedule()
        out["lr schedule"] = {"style": opt.lr_decay_style, "max lr": peak,
                              "min lr": opt.min_lr, "warmup iters": warmup,
                              "decay iters": decay}
        if opt.lr_decay_style == "WSD":
            out["lr schedule"]["wsd decay iters"] = wsd
    return out


def recomputation(config: TrainConfig) -> dict:
    """Megatron's recomputation flags (every executor runs them inside Megatron-Core's
    TransformerBlock, each pipeline stage over its own layers, as Megatron-LM does)."""
    model = config.model
    return {"granularity": model.recompute_granularity, "method": model.recompute_method,
            "layers": model.recompute_num_layers}


def describe(config: TrainConfig, source: VideoTokenSource, world_size: int) -> dict:
    """What the run would do, from its resolved configuration."""
    parallel, model, plugin = config.parallel, config.model, config.plugin
    return {
        "world size": world_size,
        "parallel layout (tp, pp, cp, dp)": [parallel.tensor_model_parallel_size,
                                             parallel.pipeline_model_parallel_size,
                                             parallel.context_parallel_size,
                                             config.data_parallel_size],
        "sequence parallel": parallel.sequence_parallel,
        "objective": plugin.objective,
        "objective config": (dataclasses.asdict(plugin.objective_config)
                             if plugin.objective_config is not None else {}),
        "window sampler": plugin.window_sampler,
        "window": dataclasses.asdict(plugin.window),
        "regularizers": {name: (dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg)
                                else None) for name, cfg in plugin.regularizers},
        "dataset": plugin.dataset,
        "dataset config": (dataclasses.asdict(plugin.dataset_config)
                           if dataclasses.is_dataclass(plugin.dataset_config) else None),
        "sample layout": dataclasses.asdict(source.layout),
        "vocabulary": source.vocab.size,
        "seq length": config.seq_length,
        "micro batch, global batch, accumulation": [config.micro_batch_size,
                                                    config.global_batch_size,
                                                    config.gradient_accumulation_steps],
        "parameters": parameter_count(config.model, source.vocab.size,
                                      parallel.tensor_model_parallel_size, config.seq_length),
        "architecture": architecture(model),
        "precision": "bf16" if model.bf16 else "fp16" if model.fp16 else "fp32",
        **schedule(config),
        "evaluation": evaluation(config, source),
        "recomputation": recomputation(config),
        "deepspeed": config.deepspeed.config,
        "flag notes": list(config.flag_notes),
        "deepspeed notes": config.deepspeed.notes,
    }
