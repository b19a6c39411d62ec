"""A DeepSpeed JSON config, as DeepSpeed users write it, reconciled with Megatron-style flags.

* A value may come from a flag or from the JSON; when both give one they must agree, or the run
  stops at start naming both. Values neither gives get the defaults documented in ``--help``.
* An ``optimizer`` section is honoured: DeepSpeed builds that optimizer and the flags' AdamW is
  not created; Megatron's LR schedule then runs from the JSON's ``lr`` and ``weight_decay``.
  A ``scheduler`` section is honoured too (DeepSpeed's scheduler replaces Megatron's). Flags
  that the sections make meaningless (``--lr``, ``--adam-*``, ``--lr-decay-style`` ...) are
  refused when given explicitly, naming the section.
* ``zero_optimization.offload_optimizer`` to ``cpu`` runs DeepSpeed's CPU Adam (ZeRO-Offload);
  on a GPU without offload the flags' AdamW is torch's fused implementation.
* A missing or malformed file is one error naming the file and the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from localopt_plugin.errors import UserError

DEFAULT_MICRO_BATCH = 2
DEFAULT_CLIP_GRAD = 1.0
# Flags whose values a JSON section takes over: refused when given together with it.
OPTIMIZER_FLAGS = {"lr": "--lr", "weight_decay": "--weight-decay",
                   "adam_beta1": "--adam-beta1", "adam_beta2": "--adam-beta2",
                   "adam_eps": "--adam-eps"}
SCHEDULER_FLAGS = {"lr_decay_style": "--lr-decay-style", "lr_warmup_iters": "--lr-warmup-iters",
                   "lr_decay_iters": "--lr-decay-iters", "min_lr": "--min-lr"}


@dataclass(frozen=True)
class DeepSpeedSetup:
    """The config dict for ``deepspeed.initialize`` and what it decided."""

    config: dict
    micro_batch_size: int
    global_batch_size: int
    gradient_accumulation_steps: int
    clip_grad: float
    bf16: bool
    fp16: bool
    json_optimizer: bool = False  # DeepSpeed builds the optimizer from the JSON
    json_scheduler: bool = False  # DeepSpeed builds the LR scheduler from the JSON
    offload_optimizer: bool = False
    schedule_lr: float | None = None  # the peak LR Megatron's schedule uses (JSON optimizer)
    schedule_weight_decay: float | None = None
    notes: list[str] = field(default_factory=list)


def load_json(path: str) -> dict:
    """The JSON object in ``path``; UserError naming the file and the problem otherwise."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise UserError(f"DeepSpeed config {path}: no such file") from None
    except json.JSONDecodeError as err:
        raise UserError(f"DeepSpeed config {path}: not valid JSON: {err}") from None
    except OSError as err:
        raise UserError(f"DeepSpeed config {path}: cannot be read: {err.strerror}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"DeepSpeed config {path}: expected a JSON object, got "
                        f"{type(cfg).__name__}")
    return cfg


def _reconcile(cfg: dict, key: str, flag: str, flag_value: Any, default: Any) -> Any:
    json_value = cfg.get(key, "auto")
    if json_value == "auto":
        json_value = None
    if flag_value is not None and json_value is not None and flag_value != json_value:
        raise UserError(f"{flag} {flag_value} disagrees with DeepSpeed config {key}={json_value}")
    return flag_value if flag_value is not None else json_value if json_value is not None else (
        default
    )


def _refuse_flags(section: str, flags: dict[str, str], explicit: set[str]) -> None:
    given = [flag for dest, flag in flags.items() if dest in explicit]
    if given:
        raise UserError(f"DeepSpeed config section {section!r} sets what {', '.join(given)} "
                        f"would set: remove {'them' if len(given) > 1 else 'it'} or the "
                        f"section")


def reconcile_deepspeed(run, optimizer, model, parallel, dp_size: int,
                        explicit: set[str] = frozenset()) -> DeepSpeedSetup:
    """Merge the JSON named by ``--deepspeed_config`` with the flags.

    ``explicit``: the dests of flags given on the command line (a JSON section is refused
    together with an explicit flag it overrides; a flag at its default gives way).
    """
    cfg: dict = load_json(run.deepspeed_config) if run.deepspeed_config else {}
    micro = _reconcile(cfg, "train_micro_batch_size_per_gpu", "--micro-batch-size",
                       run.micro_batch_size, DEFAULT_MICRO_BATCH)
    json_ga = cfg.get("gradient_accumulation_steps", "auto")
    default_global = micro * dp_size * (1 if json_ga == "auto" else int(json_ga))
    global_batch = _reconcile(cfg, "train_batch_size", "--global-batch-size",
                              run.global_batch_size, default_global)
    if global_batch % (micro * dp_size):
        raise UserError(f"global batch size {global_batch} is not divisible by micro batch "
                        f"size {micro} x data-parallel size {dp_size}")
    accumulation = global_batch // (micro * dp_size)
    if json_ga != "auto" and int(json_ga) != accumulation:
        raise UserError(f"DeepSpeed config gradient_accumulation_steps={json_ga} disagrees with "
                        f"global batch {global_batch} / (micro batch {micro} x data-parallel "
                        f"{dp_size}) = {accumulation}")
    clip = _reconcile(cfg, "gradient_clipping", "--clip-grad", optimizer.clip_grad,
                      DEFAULT_CLIP_GRAD)

    zero = dict(cfg.get("zero_optimization", {}))
    if run.zero_stage is not None:
        zero["stage"] = run.zero_stage
    zero.setdefault("stage", 0)
    if parallel.pipeline_model_parallel_size > 1 and zero["stage"] > 1:
        raise UserError(f"ZeRO stage {zero['stage']} cannot be combined with pipeline "
                        "parallelism (DeepSpeed shards gradients across the micro-batches a "
                        "pipeline accumulates); use --zero-stage 1 or 0")
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in (None, "none")
    if offload and zero["stage"] == 0:
        raise UserError("zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or 3 "
                        "(--zero-stage)")
    if offload and parallel.pipeline_model_parallel_size > 1:
        raise UserError("ZeRO-Offload is not supported with pipeline parallelism here")

    precision = {}
    for flag, key in (("bf16", "bf16"), ("fp16", "fp16")):
        enabled_in_json = cfg.get(key, {}).get("enabled", None)
        if enabled_in_json == "auto":
            enabled_in_json = None
        if getattr(model, flag) and enabled_in_json is False:
            raise UserError(f"--{flag} given but DeepSpeed config {key}.enabled=false")
        precision[flag] = bool(getattr(model, flag) or enabled_in_json)
        cfg[key] = {**cfg.get(key, {}), "enabled": precision[flag]}
    if precision["bf16"] and precision["fp16"]:
        raise UserError("bf16 and fp16 are both enabled (flags + DeepSpeed config)")

    json_optimizer, json_scheduler = "optimizer" in cfg, "scheduler" in cfg
    schedule_lr = schedule_wd = None
    notes = []
    if json_optimizer:
        _refuse_flags("optimizer", OPTIMIZER_FLAGS, explicit)
        params = cfg["optimizer"].get("params", {})
        schedule_lr = params.get("lr", optimizer.lr)
        schedule_wd = params.get("weight_decay", 0.0)
        notes.append(f"optimizer: DeepSpeed's {cfg['optimizer'].get('type')} from the JSON "
                     f"(lr {schedule_lr}, weight decay {schedule_wd})")
    if json_scheduler:
        _refuse_flags("scheduler", SCHEDULER_FLAGS, explicit)
        notes.append(f"LR schedule: DeepSpeed's {cfg['scheduler'].get('type')} from the JSON")
    if offload and not json_optimizer:
        notes.append("optimizer: DeepSpeed's CPU Adam (ZeRO-Offload)")

    cfg.update(
        train_micro_batch_size_per_gpu=micro,
        train_batch_size=global_batch,
        gradient_accumulation_steps=accumulation,
        gradient_clipping=clip,
        zero_optimization=zero,
    )
    cfg.setdefault("steps_per_print", 10**9)  # the trainer logs; keep DeepSpeed quiet
    cfg.setdefault("wall_clock_breakdown", False)
    return DeepSpeedSetup(cfg, micro, global_batch, accumulation, clip, precision["bf16"],
                          precision["fp16"], json_optimizer, json_scheduler, offload,
                          schedule_lr, schedule_wd, notes)
