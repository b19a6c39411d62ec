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

import os
from dataclasses import dataclass, field
from typing import Any

from localopt_plugin.errors import UserError
from localopt_plugin.platform import cuda_available

DEFAULT_MICRO_BATCH = 2
DEFAULT_CLIP_GRAD = 1.0
# Flags whose values a JSON section takes over: refused when given together with it.
OPTIMIZER_FLAGS = {"optimizer": "--optimizer", "lr": "--lr", "weight_decay": "--weight-decay",
                   "adam_beta1": "--adam-beta1", "adam_beta2": "--adam-beta2",
                   "adam_eps": "--adam-eps", "sgd_momentum": "--sgd-momentum",
                   "cpu_optimizer": "--cpu-optimizer"}
SCHEDULER_FLAGS = {"lr_decay_style": "--lr-decay-style", "min_lr": "--min-lr",
                   **{f"lr_{part}_{unit}": f"--lr-{part.replace('_', '-')}-{unit}"
                      for part in ("warmup", "decay", "wsd_decay")
                      for unit in ("iters", "samples")},
                   "lr_warmup_fraction": "--lr-warmup-fraction",
                   "lr_wsd_decay_style": "--lr-wsd-decay-style"}


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
    import hjson  # DeepSpeed's own reader: comments allowed, duplicate keys refused
    from deepspeed.runtime.config_utils import dict_raise_error_on_duplicate_keys

    try:
        with open(path) as f:
            cfg = hjson.load(f, object_pairs_hook=dict_raise_error_on_duplicate_keys)
    except FileNotFoundError:
        raise UserError(f"DeepSpeed config {path}: no such file") from None
    except (hjson.HjsonDecodeError, ValueError) as err:
        raise UserError(f"DeepSpeed config {path}: not valid JSON: {err}") from None
    except OSError as err:
        raise UserError(f"DeepSpeed config {path}: cannot be read: {err.strerror}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"DeepSpeed config {path}: expected a JSON object, got "
                        f"{type(cfg).__name__}")
    return cfg


def _reconcile(cfg: dict, key: str, flag: str, flag_value: Any) -> Any:
    """The flag's value or the JSON's (they must agree when both are set); None if neither."""
    json_value = cfg.get(key, "auto")
    if json_value == "auto":
        json_value = None
    if flag_value is not None and json_value is not None and flag_value != json_value:
        raise UserError(f"{flag} {flag_value} disagrees with DeepSpeed config {key}={json_value}")
    return flag_value if flag_value is not None else json_value


def _batch_sizes(global_batch: int | None, micro: int | None, accumulation: int | None,
                 dp_size: int) -> tuple[int, int, int]:
    """(global, micro, accumulation) completed as DeepSpeed completes them
    (``DeepSpeedConfig._set_batch_related_parameters``), with the plugin's micro batch of
    2 (``DEFAULT_MICRO_BATCH``) when neither a global nor a micro batch is given."""
    if global_batch is None and micro is None:
        micro = DEFAULT_MICRO_BATCH
    if global_batch is not None and micro is not None:
        if global_batch % (micro * dp_size):
            raise UserError(f"global batch size {global_batch} is not divisible by micro batch "
                            f"size {micro} x data-parallel size {dp_size}")
        derived = global_batch // (micro * dp_size)
        if accumulation is not None and accumulation != derived:
            raise UserError(f"DeepSpeed config gradient_accumulation_steps={accumulation} "
                            f"disagrees with global batch {global_batch} / (micro batch {micro} x "
                            f"data-parallel {dp_size}) = {derived}")
        return global_batch, micro, derived
    accumulation = accumulation or 1
    if micro is not None:
        return micro * accumulation * dp_size, micro, accumulation
    if global_batch % (accumulation * dp_size):
        raise UserError(f"global batch size {global_batch} is not divisible by gradient "
                        f"accumulation {accumulation} x data-parallel size {dp_size}")
    return global_batch, global_batch // (accumulation * dp_size), accumulation


# Top-level sections DeepSpeed's engine carries out itself while localopt-train drives it.
DEEPSPEED_RUNS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "optimizer", "scheduler", "fp16", "bf16", "bfloat16", "gradient_clipping",
    "zero_optimization", "steps_per_print", "wall_clock_breakdown", "dump_state",
    "prescale_gradients", "gradient_predivide_factor", "communication_data_type",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "memory_breakdown",
    "flops_profiler", "comms_logger", "checkpoint", "data_types", "timers", "disable_allgather",
    "seq_parallel_communication_data_type", "aio", "log_level", "disable_python_gc",
}
MONITORS = {"tensorboard": "tensorboard", "wandb": "wandb", "comet": "comet_ml",
            "csv_monitor": None}  # section -> the package DeepSpeed's monitor imports
REFUSED_SECTIONS = {
    "curriculum_learning": "is DeepSpeed's legacy curriculum (removed in DeepSpeed 0.19: it "
    "refuses the key); the plugin's curriculum is its window sampling: remove the section",
    "data_efficiency": "(DeepSpeed's data sampling and routing) needs DeepSpeed's own data "
    "loader, which localopt-train does not use: remove the section",
    "amp": "(NVIDIA Apex AMP) is not supported: use \"bf16\" or \"fp16\"",
    "torch_autocast": "casts inside DeepSpeed's engine, but the plugin builds the model in the "
    "precision it trains in: use \"bf16\": {\"enabled\": true} instead",
    "hybrid_engine": "is DeepSpeed-Chat's RLHF inference engine: remove the section",
    "tensor_parallel": "is DeepSpeed's AutoTP; the plugin's tensor parallelism is "
    "Megatron-Core's: use --tensor-model-parallel-size and remove the section",
    "sparse_attention": "was removed from DeepSpeed; the plugin's attention is dense: remove "
    "the section",
    "pipeline": "configures DeepSpeed's PipelineModule, which localopt-train builds itself: "
    "use --pipeline-model-parallel-size and remove the section",
    "compile": "(DeepSpeed's torch.compile / DeepCompile) is not supported with the plugin's "
    "planned forward: remove the section",
    "sparse_gradients": "needs sparse embedding gradients, which Megatron-Core's embedding does "
    "not produce: remove it",
    "elasticity": "was removed from DeepSpeed: set the batch sizes directly",
    "autotuning": "runs DeepSpeed's autotuner, which launches its own experiments: remove the "
    "section",
    "compression_training": "is DeepSpeed Compression, not supported by the plugin's model",
    "weight_quantization": "is not supported by the plugin's model",
    "quantize_training": "is not supported by the plugin's model",
    "progressive_layer_drop": "was removed from DeepSpeed: remove the section",
    "eigenvalue": "was removed from DeepSpeed: remove the section",
    "expert_parallel": "mixture-of-experts layers are not part of the plugin's model",
    "cuda_visible_devices": "is not a DeepSpeed key (DeepSpeed ignores it): choose devices with "
    "the launcher (--include / CUDA_VISIBLE_DEVICES) and remove it",
}
# activation_checkpointing options of DeepSpeed's own checkpointing, accepted only when off
DEEPSPEED_CHECKPOINTING_OPTIONS = {"partition_activations", "contiguous_memory_optimization",
                                   "cpu_checkpointing", "synchronize_checkpoint_boundary",
                                   "profile"}


def check_sections(cfg: dict) -> list[str]:
    """Every top-level section honoured (a note for the dry run) or refused by name: all the
    refusals of one config in one error line."""
    notes, refusals = [], []
    for key, value in cfg.items():
        if key in REFUSED_SECTIONS and not _active(value):
            notes.append(f"{key}: accepted, switched off (\"enabled\": false)")
        elif key == "dataloader_drop_last":
            notes.append("dataloader_drop_last: accepted, DeepSpeed's data loader is not used; "
                         "localopt-train's loader yields whole batches only")
        elif key in REFUSED_SECTIONS:
            reason = REFUSED_SECTIONS[key]
            refusals.append(f"DeepSpeed config {key!r} {reason}" if reason[0] in "i(w" else
                            f"DeepSpeed config {key!r}: {reason}")
        elif key in MONITORS:
            if isinstance(value, dict) and value.get("enabled"):
                _check_installed(MONITORS[key], key)
                notes.append(f"{key}: DeepSpeed's monitor writes its own events (loss, lr, "
                             f"samples) beside localopt-train's logs")
        elif key == "activation_checkpointing":
            set_on = [k for k, v in value.items() if v and k in DEEPSPEED_CHECKPOINTING_OPTIONS]
            if set_on:
                keys = " and ".join(f"activation_checkpointing.{k}" for k in set_on)
                refusals.append(f"DeepSpeed config {keys} {'is' if len(set_on) == 1 else 'are'} "
                                f"DeepSpeed's own checkpointing; the plugin recomputes with "
                                f"Megatron-Core (--recompute-granularity/--checkpoint-"
                                f"activations), which has no such option: set "
                                f"{'it' if len(set_on) == 1 else 'them'} false")
            else:
                notes.append("activation_checkpointing: accepted with its options off; "
                             "recomputation is Megatron-Core's (--recompute-*)")
        elif key not in DEEPSPEED_RUNS:
            refusals.append(f"DeepSpeed config {key!r} is not a section localopt-train knows "
                            f"(a typo, or a DeepSpeed feature it does not run): remove it")
    if refusals:
        raise UserError("; ".join(refusals))
    return notes


def _active(section: Any) -> bool:
    """A section switched on: not ``"enabled": false``, and not only features that are."""
    if not isinstance(section, dict):
        return True
    if section.get("enabled") is False:
        return False
    features = [v for v in section.values() if isinstance(v, dict) and "enabled" in v]
    return not features or any(_active(v) for v in features)


def _check_installed(package: str | None, section: str) -> None:
    import importlib.util

    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"DeepSpeed config {section!r} is enabled but {package} is not "
                        f"installed: pip install {package}, or set {section}.enabled false")


def check_with_deepspeed(cfg: dict, per_rank_batch: int, bf16: bool, fp16: bool) -> None:
    """DeepSpeed's own parsing of the final config (what ``deepspeed.initialize`` would reject
    at start) and its device checks, as one-line errors. The batch keys (checked already, per
    data-parallel rank) are restated for the world DeepSpeed's parser counts without an mpu:
    the whole world once a process group exists, else one process."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import DeepSpeedConfig

    world = dist.get_world_size() if dist.is_initialized() else 1
    try:
        DeepSpeedConfig({**cfg, "train_batch_size": per_rank_batch * world})
    except Exception as err:  # DeepSpeed raises assertions, pydantic and its own errors
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise UserError(f"DeepSpeed rejects the config: {'; '.join(lines[:3])}") from None
    accelerator = get_accelerator()
    fixes = {"fp16": "train in bf16 here (--bf16, or \"bf16\": {\"enabled\": true} in place of "
                     "the JSON's \"fp16\" section)",
             "bf16": "train in fp32 here (drop --bf16 and the JSON's \"bf16\" section)"}
    for key, enabled, supported in (("fp16", fp16, accelerator.is_fp16_supported),
                                    ("bf16", bf16, accelerator.is_bf16_supported)):
        if enabled and not supported():
            raise UserError(f"{key} is not supported on this device "
                            f"({accelerator.device_name()}): {fixes[key]}")


def _refuse_flags(section: str, flags: dict[str, str], explicit: set[str]) -> None:
    given = [flag for dest, flag in flags.items() if dest in explicit]
    if given:
        raise UserError(f"DeepSpeed config section {section!r} sets what {', '.join(given)} "
                        f"would set: remove {'them' if len(given) > 1 else 'it'} or the "
                        f"section")


def _precision(cfg: dict, model, notes: list[str]) -> tuple[bool, bool]:
    """bf16/fp16 from the flags and the JSON, written back under the key the user wrote
    (DeepSpeed reads ``bf16`` before its alias ``bfloat16``: adding one would hide the other)."""
    if "bf16" in cfg and "bfloat16" in cfg:
        raise UserError("DeepSpeed config has both \"bf16\" and its alias \"bfloat16\": keep one")
    bf16_key = "bfloat16" if "bfloat16" in cfg else "bf16"
    if bf16_key == "bfloat16":
        notes.append("JSON \"bfloat16\" -> bf16 (DeepSpeed's alias of \"bf16\")")
    enabled = {}
    for flag, key in (("bf16", bf16_key), ("fp16", "fp16")):
        section = cfg.get(key, {})
        if not isinstance(section, dict):
            raise UserError(f"DeepSpeed config {key}: expected an object like "
                            f"{{\"enabled\": true}}, got {section!r}")
        in_json = section.get("enabled", None)
        in_json = None if in_json == "auto" else in_json
        if getattr(model, flag) and in_json is False:
            raise UserError(f"--{flag} given but DeepSpeed config {key}.enabled=false")
        enabled[flag] = bool(getattr(model, flag) or in_json)
        if enabled[flag] or key in cfg:
            cfg[key] = {**section, "enabled": enabled[flag]}
    if enabled["bf16"] and enabled["fp16"]:
        raise UserError("bf16 and fp16 are both enabled (flags + DeepSpeed config)")
    return enabled["bf16"], enabled["fp16"]


# DeepSpeed's deprecated zero_optimization keys, read as DeepSpeed reads them (its pydantic
# config maps each to the section named, device cpu)
LEGACY_OFFLOAD_KEYS = {"cpu_offload": "offload_optimizer", "cpu_offload_param": "offload_param"}


def _zero_section(cfg: dict, notes: list[str]) -> dict:
    """``zero_optimization`` as DeepSpeed reads it: ``true``/``false`` is its legacy spelling of
    stage 1/0; ``cpu_offload`` / ``cpu_offload_param`` (and ``cpu_offload_use_pin_memory``) its
    legacy spelling of ``offload_optimizer`` / ``offload_param`` on the CPU."""
    zero = cfg.get("zero_optimization", {})
    if isinstance(zero, bool):
        notes.append(f"zero_optimization: {str(zero).lower()} -> stage {int(zero)} (DeepSpeed's "
                     "legacy spelling)")
        return {"stage": int(zero)}
    if not isinstance(zero, dict):
        raise UserError(f"DeepSpeed config zero_optimization: expected an object like "
                        f"{{\"stage\": 1}} (or true/false), got {zero!r}")
    zero = dict(zero)
    pin = zero.pop("cpu_offload_use_pin_memory", None)
    for old, new in LEGACY_OFFLOAD_KEYS.items():
        if old not in zero:
            continue
        value = zero.pop(old)
        if value and new in zero:
            raise UserError(f"DeepSpeed config zero_optimization has both {old} (its legacy "
                            f"spelling) and {new}: keep {new}")
        if value:
            zero[new] = {"device": "cpu", **({"pin_memory": pin} if pin is not None else {})}
        notes.append(f"zero_optimization.{old}: {str(value).lower()} -> "
                     + (f"{new}.device cpu" if value else "no offload")
                     + " (DeepSpeed's legacy spelling)")
    return zero


def _check_nvme(zero: dict) -> None:
    """NVMe offload needs a writable ``nvme_path`` and DeepSpeed's async I/O op (libaio):
    without them DeepSpeed stops while building the engine, after the dry run."""
    for key in ("offload_param", "offload_optimizer"):
        section = zero.get(key) or {}
        if section.get("device") != "nvme":
            continue
        path = section.get("nvme_path")
        if not path or not os.path.isdir(path) or not os.access(path, os.W_OK):
            raise UserError(f"DeepSpeed config zero_optimization.{key} offloads to NVMe at "
                            f"{path!r}, not a writable directory here: create it, point "
                            "nvme_path at one, or offload to \"cpu\"")
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if not AsyncIOBuilder().is_compatible(verbose=False):
            raise UserError(f"DeepSpeed config zero_optimization.{key}.device nvme needs "
                            "DeepSpeed's async I/O op (libaio), which this machine lacks: "
                            "install libaio (libaio-dev) or offload to \"cpu\"")


def _check_json_optimizer(section: Any) -> None:
    """What DeepSpeed's engine would refuse at start in an ``optimizer`` section, refused now:
    a type that is neither DeepSpeed's nor ``torch.optim``'s, ``max_grad_norm`` in its params."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    if not isinstance(section, dict) or not isinstance(section.get("type"), str):
        raise UserError("DeepSpeed config optimizer: expected {\"type\": NAME, \"params\": {...}}")
    name = section["type"]
    if name.lower() not in DEEPSPEED_OPTIMIZERS and getattr(torch.optim, name, None) is None:
        raise UserError(f"DeepSpeed config optimizer.type {name!r} is neither one of DeepSpeed's "
                        f"({', '.join(DEEPSPEED_OPTIMIZERS)}) nor a torch.optim class")
    if "max_grad_norm" in section.get("params", {}):
        raise UserError("DeepSpeed config optimizer.params.max_grad_norm is refused by "
                        "DeepSpeed: clip with the top-level \"gradient_clipping\" (or "
                        "--clip-grad) and remove it")


def reconcile_deepspeed(run, optimizer, model, parallel, dp_size: int,
                        explicit: set[str] = frozenset()) -> DeepSpeedSetup:
    """Merge the JSON named by ``--deepspeed_config`` with the flags.

    ``explicit``: the dests of flags given on the command line (a JSON section is refused
    together with an explicit flag it overrides; a flag at its default gives way).
    """
    cfg: dict = load_json(run.deepspeed_config) if run.deepspeed_config else {}
    notes: list[str] = check_sections(cfg)
    global_batch, micro, accumulation = _batch_sizes(
        _reconcile(cfg, "train_batch_size", "--global-batch-size", run.global_batch_size),
        _reconcile(cfg, "train_micro_batch_size_per_gpu", "--micro-batch-size",
                   run.micro_batch_size),
        _reconcile(cfg, "gradient_accumulation_steps", "gradient_accumulation_steps", None),
        dp_size)
    clip = _reconcile(cfg, "gradient_clipping", "--clip-grad", optimizer.clip_grad)
    clip = DEFAULT_CLIP_GRAD if clip is None else clip

    zero = _zero_section(cfg, notes)
    if run.zero_stage is not None:
        # Megatron-DeepSpeed's engine runs the JSON's stage and reads its flag only to build
        # the model (zero.Init at 3): a disagreement means different things there and here
        if zero.get("stage", run.zero_stage) != run.zero_stage:
            raise UserError(f"--zero-stage {run.zero_stage} disagrees with DeepSpeed config "
                            f"zero_optimization.stage={zero['stage']} (Megatron-DeepSpeed "
                            f"trains with the JSON's stage): make them agree or drop one")
        zero["stage"] = run.zero_stage
    zero.setdefault("stage", 0)
    if run.overlap_grad_reduce:
        if zero["stage"] == 0:  # DeepSpeed reads overlap_comm only in its ZeRO optimizers
            raise UserError("--overlap-grad-reduce maps to zero_optimization.overlap_comm, "
                            "which DeepSpeed applies only under ZeRO: add --zero-stage 1 (or "
                            "higher), or drop it")
        if zero.get("overlap_comm") is False:
            raise UserError("--overlap-grad-reduce disagrees with DeepSpeed config "
                            "zero_optimization.overlap_comm=false")
        zero["overlap_comm"] = True
    if parallel.pipeline_model_parallel_size > 1 and zero["stage"] > 1:
        raise UserError(f"ZeRO stage {zero['stage']} cannot be combined with pipeline "
                        "parallelism (DeepSpeed shards gradients across the micro-batches a "
                        "pipeline accumulates); use --zero-stage 1 or 0")
    if parallel.pipeline_model_parallel_size > 1 and parallel.sequence_parallel:
        # DeepSpeed's pipeline splits what crosses stages over the tensor-parallel ranks,
        # assuming it is replicated there; under sequence parallelism each rank holds its own
        # slice of the rows, sent whole
        cfg["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
        notes.append("sequence parallelism under the pipeline: pipeline.pipe_partitioned and "
                     "grad_partitioned off (each tensor-parallel rank sends its own rows)")
    _check_nvme(zero)
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in (None, "none")
    if offload and zero["stage"] == 0:
        raise UserError("zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or 3 "
                        "(--zero-stage)")
    if offload and parallel.pipeline_model_parallel_size > 1:
        raise UserError("ZeRO-Offload is not supported with pipeline parallelism here")

    bf16, fp16 = _precision(cfg, model, notes)
    if fp16 and run.fp16_loss_scaling:
        for key, value in run.fp16_loss_scaling.items():
            if key in cfg["fp16"] and cfg["fp16"][key] != value:
                raise UserError(f"the flag for fp16.{key} ({value}) disagrees with DeepSpeed "
                                f"config fp16.{key}={cfg['fp16'][key]}: drop one")
            cfg["fp16"][key] = value
    json_optimizer, json_scheduler = "optimizer" in cfg, "scheduler" in cfg
    schedule_lr = schedule_wd = None
    if json_optimizer:
        _check_json_optimizer(cfg["optimizer"])
        _refuse_flags("optimizer", OPTIMIZER_FLAGS, explicit)
        params = cfg["optimizer"].get("params", {})
        schedule_lr = params.get("lr", optimizer.lr)
        schedule_wd = params.get("weight_decay", 0.0)
        notes.append(f"optimizer: DeepSpeed's {cfg['optimizer'].get('type')} from the JSON "
                     f"(lr {schedule_lr}, weight decay {schedule_wd})")
    if json_scheduler:
        _refuse_flags("scheduler", SCHEDULER_FLAGS, explicit)
        notes.append(f"LR schedule: DeepSpeed's {cfg['scheduler'].get('type')} from the JSON")
    if offload and not json_optimizer and optimizer.optimizer != "adam":
        raise UserError(f"ZeRO-Offload runs DeepSpeed's CPU Adam; --optimizer "
                        f"{optimizer.optimizer} cannot be offloaded: use --optimizer adam or "
                        f"remove zero_optimization.offload_optimizer")
    if offload and not json_optimizer:
        notes.append("optimizer: DeepSpeed's CPU Adam (ZeRO-Offload)")
    elif optimizer.cpu_optimizer and not json_optimizer:
        if cuda_available():
            raise UserError("--cpu-optimizer steps the parameters on the CPU (DeepSpeed's CPU "
                            "Adam), which needs ZeRO-Offload where they live on a GPU: add "
                            "\"offload_optimizer\": {\"device\": \"cpu\"} to the JSON's "
                            "zero_optimization (and --zero-stage 1 or higher)")
        notes.append("optimizer: DeepSpeed's CPU Adam (--cpu-optimizer)")

    cfg.update(
        train_micro_batch_size_per_gpu=micro,
        train_batch_size=global_batch,
        gradient_accumulation_steps=accumulation,
        gradient_clipping=clip,
        zero_optimization=zero,
    )
    cfg.setdefault("steps_per_print", 10**9)  # the trainer logs; keep DeepSpeed quiet
    cfg.setdefault("wall_clock_breakdown", False)
    check_with_deepspeed(cfg, micro * accumulation, bf16, fp16)
    cp = parallel.context_parallel_size
    if parallel.pipeline_model_parallel_size > 1 and cp > 1:
        # DeepSpeed's pipeline grid counts the context ranks (which share their micro-batches)
        # as data ranks: its batch arithmetic needs the global batch x CP
        cfg["train_batch_size"] = global_batch * cp
        notes.append(f"pipeline x context parallelism: train_batch_size {global_batch} x {cp} "
                     f"for DeepSpeed's pipeline grid, which counts the context ranks as data "
                     f"ranks; the global batch stays {global_batch} samples")
    return DeepSpeedSetup(cfg, micro, global_batch, accumulation, clip, bf16, fp16,
                          json_optimizer, json_scheduler, offload, schedule_lr, schedule_wd,
                          notes)
