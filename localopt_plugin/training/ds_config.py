"""DeepSpeed JSON config reconciled with Megatron-style flags.

A value may come from a flag or from the JSON; when both give one they must agree, or the run
stops at start naming both. Values neither gives get the defaults documented in ``--help``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

DEFAULT_MICRO_BATCH = 2
DEFAULT_CLIP_GRAD = 1.0


class ConfigMismatch(SystemExit):
    pass


def _reconcile(cfg: dict, key: str, flag: str, flag_value: Any, default: Any) -> Any:
    json_value = cfg.get(key, "auto")
    if json_value == "auto":
        json_value = None
    if flag_value is not None and json_value is not None and flag_value != json_value:
        raise ConfigMismatch(
            f"error: {flag} {flag_value} disagrees with DeepSpeed config {key}={json_value}"
        )
    return flag_value if flag_value is not None else json_value if json_value is not None else (
        default
    )


def build_deepspeed_config(args: argparse.Namespace, dp_size: int) -> dict:
    """The config dict for ``deepspeed.initialize``; also fills the batch flags into ``args``."""
    cfg: dict = {}
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            cfg = json.load(f)
    micro = _reconcile(cfg, "train_micro_batch_size_per_gpu", "--micro-batch-size",
                       args.micro_batch_size, DEFAULT_MICRO_BATCH)
    json_ga = cfg.get("gradient_accumulation_steps", "auto")
    default_global = micro * dp_size * (1 if json_ga == "auto" else int(json_ga))
    global_batch = _reconcile(cfg, "train_batch_size", "--global-batch-size",
                              args.global_batch_size, default_global)
    if global_batch % (micro * dp_size):
        raise ConfigMismatch(
            f"error: global batch size {global_batch} is not divisible by micro batch size "
            f"{micro} x data-parallel size {dp_size}"
        )
    accumulation = global_batch // (micro * dp_size)
    if json_ga != "auto" and int(json_ga) != accumulation:
        raise ConfigMismatch(
            f"error: DeepSpeed config gradient_accumulation_steps={json_ga} disagrees with "
            f"global batch {global_batch} / (micro batch {micro} x data-parallel {dp_size}) "
            f"= {accumulation}"
        )
    clip = _reconcile(cfg, "gradient_clipping", "--clip-grad", args.clip_grad, DEFAULT_CLIP_GRAD)

    zero = dict(cfg.get("zero_optimization", {}))
    if args.zero_stage is not None:
        zero["stage"] = args.zero_stage
    zero.setdefault("stage", 0)
    if args.pipeline_model_parallel_size > 1 and zero["stage"] > 1:
        raise ConfigMismatch(
            f"error: ZeRO stage {zero['stage']} cannot be combined with pipeline parallelism "
            "(DeepSpeed shards gradients across the micro-batches a pipeline accumulates); "
            "use --zero-stage 1 or 0"
        )

    for flag, key in (("bf16", "bf16"), ("fp16", "fp16")):
        enabled_in_json = cfg.get(key, {}).get("enabled", None)
        if enabled_in_json == "auto":
            enabled_in_json = None
        if getattr(args, flag) and enabled_in_json is False:
            raise ConfigMismatch(f"error: --{flag} given but DeepSpeed config {key}.enabled=false")
        if enabled_in_json:
            setattr(args, flag, True)
        cfg[key] = {**cfg.get(key, {}), "enabled": bool(getattr(args, flag))}
    if args.bf16 and args.fp16:
        raise ConfigMismatch("error: bf16 and fp16 are both enabled (flags + DeepSpeed config)")

    args.micro_batch_size, args.global_batch_size, args.clip_grad = micro, global_batch, clip
    args.gradient_accumulation_steps = accumulation
    cfg.update(
        train_micro_batch_size_per_gpu=micro,
        train_batch_size=global_batch,
        gradient_accumulation_steps=accumulation,
        gradient_clipping=clip,
        zero_optimization=zero,
    )
    cfg.setdefault("steps_per_print", 10**9)  # the trainer logs; keep DeepSpeed quiet
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg
