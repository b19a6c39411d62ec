"""The run's configuration: flags -> per-concern configs -> one resolved :class:`TrainConfig`.

Parsed flags are converted once, at the edge (:func:`resolve`), into frozen dataclasses: the
model and its parallel layout, the objective and its windows, each regularizer's and the
dataset's own config (from the registry), the optimizer and the run. Values derived from the
data, the DeepSpeed JSON and the world size (sequence length, batch sizes, gradient
accumulation, precision) are resolved there too, and the rest of the code reads only the result.
A checkpoint stores :meth:`TrainConfig.to_dict`, versioned, and :func:`model_config_from_saved`
reads any version back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from localopt_plugin import registry
from localopt_plugin.config_flags import FlagConfig, argument_group, option
from localopt_plugin.data.manifest import check_manifest_against_model
from localopt_plugin.data.source import VideoTokenSource
from localopt_plugin.errors import UserError
from localopt_plugin.model.config import (
    ModelConfig,
    ParallelConfig,
    fields_from,
    from_dict,
    padded_vocab_size,
)
from localopt_plugin.objectives import Objective
from localopt_plugin.plugin import PluginConfig, PluginParts, keep_recorded_settings

CONFIG_VERSION = 2  # 1: the flags as a flat dict under "args" (before typed configs)
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
DEFAULT_TRAIN_ITERS = 100  # Megatron-LM has no default: it needs --train-iters or --train-samples
OPTIMIZERS = ("adam", "sgd")  # Megatron-LM's others (muon, lion, soap) are refused by name


@dataclass(frozen=True)
class OptimizerConfig(FlagConfig):
    """The optimizer and Megatron's LR/weight-decay schedule (Megatron-LM flags, defaults and
    meaning: ``--optimizer adam`` is AdamW; a schedule is given in iterations or, with
    ``--train-samples``, in samples)."""

    GROUP: ClassVar[str] = "optimizer and learning-rate schedule (Megatron-LM flags)"

    optimizer: str = option("adam", "adam: AdamW (Megatron's adam, decoupled weight decay); "
                            "sgd: SGD with --sgd-momentum", choices=OPTIMIZERS)
    lr: float = option(3e-4, "peak learning rate")
    min_lr: float = option(0.0, "learning rate at the end of the decay")
    lr_decay_style: str = option("linear", "decay after warm-up", choices=LR_DECAY_STYLES)
    lr_warmup_iters: int = option(0, "warm-up in iterations")
    lr_warmup_samples: int = option(0, "warm-up in samples (with --train-samples)")
    lr_warmup_fraction: float | None = option(None, "warm-up as a fraction of the decay "
                                              "length", type=float)
    lr_decay_iters: int | None = option(None, "decay length (default: --train-iters)", type=int)
    lr_decay_samples: int | None = option(None, "decay in samples (with --train-samples; "
                                          "default: --train-samples)", type=int)
    lr_wsd_decay_style: str = option("exponential", "WSD's final decay",
                                     choices=("exponential", "linear", "cosine", "minus_sqrt"))
    lr_wsd_decay_iters: int | None = option(None, "WSD's final decay (default: a tenth of the "
                                            "decay length)", type=int)
    lr_wsd_decay_samples: int | None = option(None, "WSD's final decay in samples", type=int)
    lr_warmup_tokens: int | None = option(None, "Megatron-DeepSpeed: warm-up in tokens "
                                          "(samples x --seq-length)", type=int)
    lr_decay_tokens: int | None = option(None, "Megatron-DeepSpeed: decay in tokens (samples x "
                                         "--seq-length)", type=int)
    override_opt_param_scheduler: bool = option(
        False, "on --load, the LR schedule of the flags replaces the checkpoint's",
        flag="--override-opt_param-scheduler")
    use_checkpoint_opt_param_scheduler: bool = option(
        False, "on --load, keep the checkpoint's LR schedule (default: the flags' must match "
        "it, as in Megatron-LM)", flag="--use-checkpoint-opt_param-scheduler")
    weight_decay: float = option(0.01, "decoupled weight decay")
    adam_beta1: float = option(0.9, "Adam's beta1")
    adam_beta2: float = option(0.999, "Adam's beta2")
    adam_eps: float = option(1e-8, "Adam's epsilon")
    sgd_momentum: float = option(0.9, "SGD's momentum")
    clip_grad: float | None = option(None, "gradient-norm clipping (default: the JSON's "
                                     "gradient_clipping, else 1.0)", type=float)
    cpu_optimizer: bool = option(
        False, "Megatron-DeepSpeed: the Adam step runs on the CPU (DeepSpeed's CPU Adam, AdamW "
        "mode); parameters on a GPU need ZeRO-Offload in the JSON, as its offload examples have")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **values: Any) -> OptimizerConfig:
        config = super().from_args(args, **values)
        config.check_schedule(sample_based=getattr(args, "train_samples", None) is not None)
        return config

    def validate(self) -> None:
        if self.lr_warmup_fraction is not None and (self.lr_warmup_iters
                                                    or self.lr_warmup_samples):
            raise UserError("give one of --lr-warmup-fraction and --lr-warmup-iters/-samples")
        if self.cpu_optimizer and self.optimizer != "adam":
            raise UserError(f"--cpu-optimizer runs DeepSpeed's CPU Adam (Megatron-DeepSpeed: "
                            f"'CPU offloading is for Adam'): drop --optimizer {self.optimizer} "
                            f"or --cpu-optimizer")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise UserError("give one of --override-opt_param-scheduler and "
                            "--use-checkpoint-opt_param-scheduler")

    def check_schedule(self, sample_based: bool) -> None:
        """Megatron-LM's rules: a schedule is in iterations or in samples, never both."""
        if sample_based:
            given = [flag for flag, value in (("--lr-decay-iters", self.lr_decay_iters),
                                              ("--lr-warmup-iters", self.lr_warmup_iters),
                                              ("--lr-wsd-decay-iters", self.lr_wsd_decay_iters))
                     if value]
            if given:
                raise UserError(f"--train-samples makes the schedule sample-based: use the "
                                f"-samples form of {', '.join(given)}")
        else:
            given = [flag for flag, value in (
                ("--lr-decay-samples", self.lr_decay_samples),
                ("--lr-warmup-samples", self.lr_warmup_samples),
                ("--lr-wsd-decay-samples", self.lr_wsd_decay_samples)) if value]
            if given:
                raise UserError(f"{', '.join(given)} need sample-based training "
                                f"(--train-samples instead of --train-iters)")

    def schedule_iters(self, train_iters: int, train_samples: int | None, global_batch: int,
                       seq_length: int) -> tuple[float, float, float | None]:
        """(warm-up, decay, WSD decay) in iterations, as Megatron-LM derives them: a
        sample-based schedule divided by the global batch gives the LR Megatron's counting in
        samples gives at every iteration; Megatron-DeepSpeed's token counts (which take
        precedence) are samples x ``seq_length``. WSD's decay defaults to a tenth of the
        decay length."""
        if train_samples is not None:
            decay = (self.lr_decay_samples or train_samples) / global_batch
            warmup = self.lr_warmup_samples / global_batch
            wsd = self.lr_wsd_decay_samples
            wsd = None if wsd is None else wsd / global_batch
        else:
            decay, warmup = float(self.lr_decay_iters or train_iters), self.lr_warmup_iters
            wsd = self.lr_wsd_decay_iters
        tokens_per_iter = global_batch * seq_length
        if self.lr_decay_tokens is not None:
            decay = self.lr_decay_tokens / tokens_per_iter
        if self.lr_warmup_fraction is not None:
            warmup = self.lr_warmup_fraction * decay
        if self.lr_warmup_tokens is not None:
            warmup = self.lr_warmup_tokens / tokens_per_iter
        if self.lr_decay_style == "WSD" and wsd is None:
            wsd = decay / 10  # Megatron-LM requires --lr-wsd-decay-*; a tenth here
        return warmup, decay, wsd


TRAINING = "training (Megatron-LM flags)"
CHECKPOINTS = "checkpointing and logging (Megatron-LM flags)"
DEEPSPEED = "DeepSpeed"
TRAINER = "localopt-train"


@dataclass(frozen=True)
class RunConfig(FlagConfig):
    """Iterations, batch sizes, checkpoints, logging and the DeepSpeed JSON (Megatron-LM flags
    where Megatron has them)."""

    GROUP: ClassVar[str] = TRAINING

    train_iters: int | None = option(
        None, f"default: --train-samples / global batch, else {DEFAULT_TRAIN_ITERS}", type=int)
    train_samples: int | None = option(
        None, "sample-based training (Megatron-LM): iterations = samples // global batch, the "
        "LR schedule in samples (--lr-*-samples)", type=int)
    train_tokens: int | None = option(
        None, "Megatron-DeepSpeed: also stop once this many tokens (samples x --seq-length) "
        "are consumed", type=int)
    exit_duration_in_mins: float | None = option(
        None, "stop (after saving, if --save) once training has run this long", type=float)
    exit_interval: int | None = option(
        None, "stop (after saving, if --save) at the first iteration divisible by it, as "
        "Megatron-LM", type=int)
    seed: int = option(1234, "initialisation, data order, window draws, dropout")
    micro_batch_size: int | None = option(
        None, "default: the DeepSpeed JSON's train_micro_batch_size_per_gpu, else 2", type=int)
    global_batch_size: int | None = option(
        None, "default: the JSON's train_batch_size, else micro batch x data-parallel",
        type=int)
    save: str | None = option(None, "checkpoint directory to save to", group=CHECKPOINTS)
    load: str | None = option(None, "checkpoint directory to resume from", group=CHECKPOINTS)
    no_load_optim: bool = option(False, "with --load: fresh optimizer (and, as in Megatron, LR "
                                 "schedule) state", group=CHECKPOINTS)
    no_load_rng: bool = option(False, "with --load: keep this run's random states (dropout "
                               "masks)", group=CHECKPOINTS)
    no_load_lr_state: bool = option(False, "Megatron-DeepSpeed, with --load: restart the LR "
                                    "schedule", group=CHECKPOINTS)
    finetune: bool = option(False, "with --load: the weights only; iteration, consumed "
                            "samples, optimizer, LR schedule and random states start afresh "
                            "(Megatron-LM's meaning)", group=CHECKPOINTS)
    reset_iteration: bool = option(False, "Megatron-DeepSpeed, with --load: iteration and "
                                   "consumed samples start at 0, the optimizer and LR schedule "
                                   "states are loaded", group=CHECKPOINTS)
    save_interval: int | None = option(None, "iterations between checkpoints (default: at the "
                                       "end)", type=int, group=CHECKPOINTS)
    log_interval: int = option(100, "iterations between log lines", group=CHECKPOINTS)
    eval_interval: int | None = option(None, "iterations between evaluations on the "
                                       "validation data (default: none, as Megatron-LM)",
                                       type=int, group=CHECKPOINTS)
    eval_iters: int = option(100, "global batches (of --global-batch-size samples) per "
                             "evaluation (Megatron's meaning and default)", group=CHECKPOINTS)
    tensorboard_dir: str | None = option(None, "TensorBoard event directory",
                                         group=CHECKPOINTS)
    metrics_file: str | None = option(None, "append every iteration's metrics as a JSON line "
                                      "(rank 0)", group=TRAINER)
    progress: str = option("auto", "progress bar (auto: when attached to a terminal)",
                           choices=("auto", "on", "off"), group=TRAINER)
    deepspeed_config: str | None = None  # --deepspeed_config (EXTRA_FLAGS: two spellings)
    zero_stage: int | None = option(None, "ZeRO stage (zero_optimization.stage; with a JSON "
                                    "that sets it, both must agree)", type=int,
                                    choices=(0, 1, 2, 3), group=DEEPSPEED)
    overlap_grad_reduce: bool = False  # Megatron's flag, mapped (megatron_flags)
    tensorboard_queue_size: int = option(1000, "TensorBoard events buffered before a write "
                                         "(Megatron-LM's default)", group=CHECKPOINTS)
    log_optimizer_states_to_tensorboard: bool = option(
        False, "Megatron-DeepSpeed: norms of Adam's moments and of the weights at each "
        "--log-interval (TensorBoard, --metrics-file)", group=CHECKPOINTS)
    fp16_loss_scaling: dict = dataclasses.field(default_factory=dict)  # --hysteresis ... -> JSON

    EXTRA_FLAGS: ClassVar = (
        (CHECKPOINTS, ("--data-path",), dict(nargs="*", default=None)),
        (CHECKPOINTS, ("--valid-data-path",), dict(nargs="*", default=None)),
        (DEEPSPEED, ("--deepspeed",), dict(action="store_true", help="accepted for "
                                           "Megatron-DeepSpeed scripts; DeepSpeed always runs "
                                           "the loop")),
        (DEEPSPEED, ("--deepspeed_config", "--deepspeed-config"), dict(
            dest="deepspeed_config", default=None, help="DeepSpeed JSON config (see "
            "ds_configs/)")))

    @classmethod
    def from_args(cls, args: argparse.Namespace, **values: Any) -> RunConfig:
        train_iters, train_samples = args.train_iters, getattr(args, "train_samples", None)
        if train_iters is not None and train_samples is not None:
            raise UserError("give one of --train-iters and --train-samples (Megatron-LM: "
                            "iteration-based or sample-based training)")
        if train_samples is not None and train_samples < 1:
            raise UserError(f"--train-samples must be >= 1, got {train_samples}")
        # sample-based: the iterations follow once the global batch is known (resolve())
        return super().from_args(
            args, train_iters=DEFAULT_TRAIN_ITERS if train_iters is None else train_iters,
            **{name: getattr(args, name) for name in (
                "deepspeed_config", "overlap_grad_reduce", "fp16_loss_scaling")
               if hasattr(args, name)}, **values)

    def validate(self) -> None:
        if self.train_iters < 0 or self.eval_iters < 1 or self.log_interval < 1:
            raise UserError("--train-iters must be >= 0, --eval-iters and --log-interval >= 1")
        if self.exit_interval is not None and self.exit_interval < 1:
            raise UserError(f"--exit-interval must be >= 1, got {self.exit_interval}")
        resume = [self.flag(name) for name in ("no_load_optim", "no_load_rng",
                                               "no_load_lr_state", "finetune",
                                               "reset_iteration") if getattr(self, name)]
        if resume and not self.load:
            raise UserError(f"{' and '.join(resume)} without --load: they say what a resumed "
                            "run loads; add --load CHECKPOINT_DIR or drop them")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's training, optimizer, checkpointing and logging flags, and DeepSpeed's."""
    RunConfig.add_args(parser)
    OptimizerConfig.add_args(parser)


def add_trainer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of localopt-train itself (Megatron-LM has its own logging and checks)."""
    g = argument_group(parser, TRAINER)
    g.add_argument("--tokenizer", default=None,
                   help="registered video tokenizer the data must have been made with "
                   "(checked against the shards' manifest)")
    g.add_argument("--dry-run", action="store_true",
                   help="validate flags and the DeepSpeed config, build the DeepSpeed engine "
                   "on a one-layer stand-in and take one step on one sample of the data, print the "
                   "resolved setup and exit (world size from $WORLD_SIZE, default 1)")
    return parser


# the configurations of Megatron's own flags (Megatron's names, defaults and meaning)
MEGATRON_CONFIGS = (ModelConfig, ParallelConfig, OptimizerConfig, RunConfig)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run reads, resolved once (see :func:`resolve`)."""

    model: ModelConfig
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    run: RunConfig
    plugin: PluginConfig
    seq_length: int = 0
    data_parallel_size: int = 1
    micro_batch_size: int = 2
    global_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    deepspeed: Any = None  # the DeepSpeedSetup (JSON merged with the flags)
    flag_notes: tuple[str, ...] = ()  # Megatron flags mapped from aliases or accepted, and why

    def to_dict(self) -> dict:
        """JSON-ready, versioned: what checkpoints store."""
        def plain(value):
            return json.loads(json.dumps(
                dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value,
                default=str))
        plugin = self.plugin
        return {
            "version": CONFIG_VERSION,
            "model": plain(self.model), "parallel": plain(self.parallel),
            "optimizer": plain(self.optimizer), "run": plain(self.run),
            "objective": plugin.objective, "objective_config": plain(plugin.objective_config),
            "window_sampler": plugin.window_sampler, "window": plain(plugin.window),
            "dataset": plugin.dataset, "dataset_config": plain(plugin.dataset_config),
            "regularizers": [[name, plain(cfg)] for name, cfg in plugin.regularizers],
            "seq_length": self.seq_length, "data_parallel_size": self.data_parallel_size,
            "micro_batch_size": self.micro_batch_size,
            "global_batch_size": self.global_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "deepspeed": plain(self.deepspeed.config) if self.deepspeed else None,
        }

    def lr_schedule(self) -> tuple[float, float, float, float | None]:
        """(peak LR, warm-up, decay, WSD decay), the last three in iterations: what Megatron's
        scheduler is given (the peak is the JSON optimizer's ``lr`` when it has one)."""
        peak = self.deepspeed.schedule_lr
        peak = self.optimizer.lr if peak is None else peak
        return (peak, *self.optimizer.schedule_iters(
            self.run.train_iters, self.run.train_samples, self.global_batch_size,
            self.seq_length))


@dataclass(frozen=True)
class Prepared:
    """What ``localopt-train`` builds from its flags before any process group starts."""

    plugin: PluginConfig
    source: VideoTokenSource
    objective: Objective
    notes: tuple[str, ...] = ()  # flags mapped or accepted, settings kept from --load


def prepare(args: argparse.Namespace, explicit: set[str] | None = None) -> Prepared:
    """The flags resolved once (Megatron's aliases mapped, a resumed checkpoint's regularizer
    settings kept, a refused flag or bad component setting stopped here naming it), the
    dataset and the objective built once. ``explicit``: dests of the flags given on the
    command line (without it, settings that differ from their defaults count as given)."""
    from localopt_plugin.training.checkpoint import recorded_config
    from localopt_plugin.training.megatron_flags import disputed_defaults, resolve_megatron_flags

    notes = resolve_megatron_flags(args, explicit or set())
    notes += disputed_defaults([(cls.flag(f.name), cls.dest(f.name), f.default)
                                for cls in MEGATRON_CONFIGS for f in cls.flag_fields()],
                               explicit or set())
    if args.load and (recorded := recorded_config(args.load)) is not None:
        notes += keep_recorded_settings(args, recorded, explicit or set())
    plugin = PluginConfig.from_args(args, explicit)
    source = plugin.build_dataset()
    return Prepared(plugin, source, plugin.build_objective(source.layout), tuple(notes))


def resolve(args: argparse.Namespace, world_size: int, prepared: Prepared | None = None,
            explicit: set[str] | None = None) -> tuple[TrainConfig, PluginParts]:
    """Flags -> configs and the run's parts (dataset, objective, regularizers), each once;
    ``prepared``: what :func:`prepare` built from the same ``args`` (built here if None).

    ``explicit``: dests of the flags given on the command line (see
    :func:`~localopt_plugin.training.deepspeed_config.reconcile_deepspeed`).
    Raises :class:`UserError` naming the flag, file or JSON key to change.
    """
    from localopt_plugin.training.deepspeed_config import reconcile_deepspeed

    prepared = prepared or prepare(args, explicit)
    explicit = explicit or set()
    plugin, source, objective = prepared.plugin, prepared.source, prepared.objective
    model = ModelConfig.from_args(args)
    parallel = ParallelConfig.from_args(args)
    parallel.check_model(model)
    parallel.check_world(world_size)
    if parallel.pipeline_model_parallel_size > 1 and model.transformer_impl != "local":
        raise UserError("--pipeline-model-parallel-size > 1 with --transformer-impl "
                        f"{model.transformer_impl}: the pipeline's GPTModel stages would build "
                        "TransformerEngine's spec, but that has not been tested on a GPU yet; "
                        "use --transformer-impl local")
    run = RunConfig.from_args(args)
    optimizer = OptimizerConfig.from_args(args)
    _check_tokenizer(getattr(args, "tokenizer", None), source)

    layout = source.layout
    seq_length = args.seq_length or layout.input_length
    if seq_length < layout.input_length:
        raise UserError(f"--seq-length {seq_length} is shorter than the dataset's samples "
                        f"({layout.input_length} input tokens)")
    model = dataclasses.replace(
        model, max_position_embeddings=model.max_position_embeddings or seq_length)
    if "manifest" in source.info:
        check_manifest_against_model(
            source.info["manifest"],
            padded_vocab_size(source.vocab.size, model.make_vocab_size_divisible_by,
                              parallel.tensor_model_parallel_size),
            seq_length)
    dp = world_size // parallel.model_parallel_size
    ds = reconcile_deepspeed(run, optimizer, model, parallel, dp, explicit)
    if run.train_samples is not None:  # Megatron-LM: iterations = samples // global batch
        run = dataclasses.replace(run, train_iters=run.train_samples // ds.global_batch_size)
        if run.train_iters < 1:
            raise UserError(f"--train-samples {run.train_samples} is less than one global "
                            f"batch ({ds.global_batch_size})")
    if run.train_tokens is not None:  # Megatron-DeepSpeed stops once the tokens are consumed
        tokens_per_iter = ds.global_batch_size * seq_length
        run = dataclasses.replace(run, train_iters=min(
            run.train_iters, -(-run.train_tokens // tokens_per_iter)))
    config = TrainConfig(
        model=dataclasses.replace(model, bf16=ds.bf16, fp16=ds.fp16),
        parallel=parallel,
        optimizer=dataclasses.replace(optimizer, clip_grad=ds.clip_grad),
        run=run, plugin=plugin, seq_length=seq_length, data_parallel_size=dp,
        micro_batch_size=ds.micro_batch_size, global_batch_size=ds.global_batch_size,
        gradient_accumulation_steps=ds.gradient_accumulation_steps, deepspeed=ds,
        flag_notes=prepared.notes)
    regularizers = plugin.build_regularizers(run.train_iters)  # cosine: the run's length
    zero = ds.config["zero_optimization"]
    if zero["stage"] == 3 and parallel.context_parallel_size > 1 and not zero.get(
            "reduce_scatter", True):
        raise UserError("zero_optimization.reduce_scatter false with ZeRO-3 and "
                        "--context-parallel-size > 1: DeepSpeed then reduces large buckets "
                        "with a reduce-scatter and small ones with an all-reduce that scale the "
                        "context-parallel shares differently; leave reduce_scatter at its "
                        "default (true)")
    if (getattr(objective, "sampler", None) is not None and plugin.window.scope == "micro-batch"
            and ds.config["zero_optimization"]["stage"] == 3 and dp > 1):
        raise UserError("ZeRO-3 gathers parameters module by module on every rank at once, so "
                        "all ranks must run the same passes; with --local-opt-window-scope "
                        "micro-batch they draw different windows: use "
                        "--local-opt-window-scope step or --zero-stage 1/2")
    return config, PluginParts(source, objective, regularizers)


def _check_tokenizer(name: str | None, source: VideoTokenSource) -> None:
    """``--tokenizer``: registered, and the one the shards were made with."""
    if name is None:
        return
    from localopt_plugin import tokenizers  # noqa: F401  registers the built-in tokenizers

    registry.get("tokenizer", name)  # an unknown name is a UserError listing the names
    manifest = source.info.get("manifest")
    if manifest is not None and manifest.tokenizer != name:
        raise UserError(f"--tokenizer {name}, but {manifest.path} was made with tokenizer "
                        f"{manifest.tokenizer!r}")


def model_config_from_saved(saved: dict) -> ModelConfig:
    """The ModelConfig of a checkpoint's saved config, any version (fields added since get
    their defaults)."""
    if "version" not in saved:  # version 1: the flat flags
        return ModelConfig(**fields_from(ModelConfig, argparse.Namespace(**saved)))
    return from_dict(ModelConfig, saved["model"])


def parallel_config_from_saved(saved: dict) -> ParallelConfig:
    if "version" not in saved:
        return ParallelConfig(**fields_from(ParallelConfig, argparse.Namespace(**saved)))
    return from_dict(ParallelConfig, saved["parallel"])


def dataset_from_saved(saved: dict) -> tuple[str, Any]:
    """The dataset name and its config from a checkpoint's saved config, any version."""
    name = saved["dataset"]
    if "version" not in saved:
        return name, registry.config_from_args("dataset", name, argparse.Namespace(**saved))
    config_cls = registry.get("dataset", name).config
    values = saved.get("dataset_config")
    return name, (from_dict(config_cls, values) if config_cls is not None and values else None)


def seed_from_saved(saved: dict) -> int:
    return saved["seed"] if "version" not in saved else saved["run"]["seed"]
