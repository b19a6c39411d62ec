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
from typing import Any

from localopt_plugin import registry
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
from localopt_plugin.plugin import PluginConfig

CONFIG_VERSION = 2  # 1: the flags as a flat dict under "args" (before typed configs)
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
DEFAULT_TRAIN_ITERS = 100  # Megatron-LM has no default: it needs --train-iters or --train-samples
OPTIMIZERS = ("adam", "sgd")  # Megatron-LM's others (muon, lion, soap) are refused by name


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer and Megatron's LR/weight-decay schedule (Megatron-LM flags, defaults and
    meaning: ``--optimizer adam`` is AdamW; a schedule is given in iterations or, with
    ``--train-samples``, in samples)."""

    optimizer: str = "adam"
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_decay_style: str = "linear"
    lr_warmup_iters: int = 0
    lr_warmup_samples: int = 0
    lr_warmup_fraction: float | None = None
    lr_decay_iters: int | None = None
    lr_decay_samples: int | None = None
    lr_wsd_decay_style: str = "exponential"
    lr_wsd_decay_iters: int | None = None
    lr_wsd_decay_samples: int | None = None
    lr_warmup_tokens: int | None = None
    lr_decay_tokens: int | None = None
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    clip_grad: float | None = None

    @staticmethod
    def add_args(g: argparse._ArgumentGroup) -> None:
        g.add_argument("--optimizer", default="adam", choices=OPTIMIZERS,
                       help="adam: AdamW (Megatron's adam, decoupled weight decay); sgd: SGD "
                       "with --sgd-momentum")
        g.add_argument("--lr", type=float, default=3e-4)
        g.add_argument("--min-lr", type=float, default=0.0)
        g.add_argument("--lr-decay-style", default="linear", choices=LR_DECAY_STYLES)
        g.add_argument("--lr-warmup-iters", type=int, default=0)
        g.add_argument("--lr-warmup-samples", type=int, default=0,
                       help="warm-up in samples (with --train-samples)")
        g.add_argument("--lr-warmup-fraction", type=float, default=None,
                       help="warm-up as a fraction of the decay length")
        g.add_argument("--lr-decay-iters", type=int, default=None,
                       help="default: --train-iters")
        g.add_argument("--lr-decay-samples", type=int, default=None,
                       help="decay in samples (with --train-samples; default: --train-samples)")
        g.add_argument("--lr-wsd-decay-style", default="exponential",
                       choices=("exponential", "linear", "cosine", "minus_sqrt"))
        g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                       help="WSD's final decay (default: a tenth of the decay length)")
        g.add_argument("--lr-wsd-decay-samples", type=int, default=None)
        g.add_argument("--lr-warmup-tokens", type=int, default=None,
                       help="Megatron-DeepSpeed: warm-up in tokens (samples x --seq-length)")
        g.add_argument("--lr-decay-tokens", type=int, default=None,
                       help="Megatron-DeepSpeed: decay in tokens (samples x --seq-length)")
        g.add_argument("--override-opt_param-scheduler", action="store_true",
                       help="on --load, the LR schedule of the flags replaces the checkpoint's")
        g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                       help="on --load, keep the checkpoint's LR schedule (default: the flags' "
                       "must match it, as in Megatron-LM)")
        g.add_argument("--weight-decay", type=float, default=0.01)
        g.add_argument("--adam-beta1", type=float, default=0.9)
        g.add_argument("--adam-beta2", type=float, default=0.999)
        g.add_argument("--adam-eps", type=float, default=1e-8)
        g.add_argument("--sgd-momentum", type=float, default=0.9)
        g.add_argument("--clip-grad", type=float, default=None,
                       help="default: the JSON's gradient_clipping, else 1.0")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OptimizerConfig:
        config = cls(**fields_from(cls, args))
        config.validate(sample_based=getattr(args, "train_samples", None) is not None)
        return config

    def validate(self, sample_based: bool) -> None:
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
        if self.lr_warmup_fraction is not None and (self.lr_warmup_iters
                                                    or self.lr_warmup_samples):
            raise UserError("give one of --lr-warmup-fraction and --lr-warmup-iters/-samples")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise UserError("give one of --override-opt_param-scheduler and "
                            "--use-checkpoint-opt_param-scheduler")

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


@dataclass(frozen=True)
class RunConfig:
    """Iterations, batch sizes, checkpoints, logging and the DeepSpeed JSON (Megatron-LM flags
    where Megatron has them)."""

    train_iters: int = DEFAULT_TRAIN_ITERS
    train_samples: int | None = None
    train_tokens: int | None = None
    exit_duration_in_mins: float | None = None
    exit_interval: int | None = None
    seed: int = 1234
    micro_batch_size: int | None = None
    global_batch_size: int | None = None
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    log_interval: int = 100
    eval_interval: int | None = None
    eval_iters: int = 10
    tensorboard_dir: str | None = None
    metrics_file: str | None = None
    progress: str = "auto"
    deepspeed_config: str | None = None
    zero_stage: int | None = None
    overlap_grad_reduce: bool = False
    tensorboard_queue_size: int = 1000
    log_optimizer_states_to_tensorboard: bool = False
    fp16_loss_scaling: dict = dataclasses.field(default_factory=dict)  # --hysteresis ... -> JSON

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        train_iters, train_samples = args.train_iters, getattr(args, "train_samples", None)
        if train_iters is not None and train_samples is not None:
            raise UserError("give one of --train-iters and --train-samples (Megatron-LM: "
                            "iteration-based or sample-based training)")
        if train_samples is not None and train_samples < 1:
            raise UserError(f"--train-samples must be >= 1, got {train_samples}")
        # sample-based: the iterations follow once the global batch is known (resolve())
        config = cls(**fields_from(cls, args, train_iters=(
            DEFAULT_TRAIN_ITERS if train_iters is None else train_iters)))
        if config.train_iters < 0 or config.eval_iters < 1 or config.log_interval < 1:
            raise UserError("--train-iters must be >= 0, --eval-iters and --log-interval >= 1")
        if config.exit_interval is not None and config.exit_interval < 1:
            raise UserError(f"--exit-interval must be >= 1, got {config.exit_interval}")
        return config


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's training, checkpointing and logging flags, and DeepSpeed's."""
    g = parser.add_argument_group("training (Megatron-LM flags)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="default: the DeepSpeed JSON's train_micro_batch_size_per_gpu, else 2")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: the JSON's train_batch_size, else micro batch x data-parallel")
    g.add_argument("--train-iters", type=int, default=None,
                   help=f"default: --train-samples / global batch, else {DEFAULT_TRAIN_ITERS}")
    g.add_argument("--train-samples", type=int, default=None,
                   help="sample-based training (Megatron-LM): iterations = samples // global "
                   "batch, the LR schedule in samples (--lr-*-samples)")
    g.add_argument("--train-tokens", type=int, default=None,
                   help="Megatron-DeepSpeed: also stop once this many tokens (samples x "
                   "--seq-length) are consumed")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop (after saving, if --save) once training has run this long")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving, if --save) at the first iteration divisible by it, "
                   "as Megatron-LM")
    OptimizerConfig.add_args(g)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)

    g = parser.add_argument_group("checkpointing and logging (Megatron-LM flags)")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10,
                   help="global batches (of --global-batch-size samples) per evaluation, as "
                   "in Megatron")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--tensorboard-queue-size", type=int, default=1000,
                   help="TensorBoard events buffered before a write (Megatron-LM's default)")
    g.add_argument("--log-optimizer-states-to-tensorboard", action="store_true",
                   help="Megatron-DeepSpeed: norms of Adam's moments and of the weights at each "
                   "--log-interval (TensorBoard, --metrics-file)")
    g.add_argument("--data-path", nargs="*", default=None)
    g.add_argument("--valid-data-path", nargs="*", default=None)

    g = parser.add_argument_group("DeepSpeed")
    g.add_argument("--deepspeed", action="store_true",
                   help="accepted for Megatron-DeepSpeed scripts; DeepSpeed always runs the loop")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   default=None, help="DeepSpeed JSON config (see ds_configs/)")
    g.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3],
                   help="overrides zero_optimization.stage of the JSON")


def add_trainer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of localopt-train itself (Megatron-LM has its own logging and checks)."""
    g = parser.add_argument_group("localopt-train")
    g.add_argument("--tokenizer", default=None,
                   help="registered video tokenizer the data must have been made with "
                   "(checked against the shards' manifest)")
    g.add_argument("--metrics-file", default=None,
                   help="append every iteration's metrics as a JSON line (rank 0)")
    g.add_argument("--dry-run", action="store_true",
                   help="validate flags and the DeepSpeed config, print the resolved setup and "
                   "exit without building the model or touching data (world size from "
                   "$WORLD_SIZE, default 1)")
    g.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress bar (auto: when attached to a terminal)")
    return parser


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

    def build_objective(self, layout):
        return self.plugin.build_objective(layout)

    def build_regularizers(self) -> list:
        return self.plugin.build_regularizers(self.run.train_iters)


def resolve(args: argparse.Namespace, world_size: int, source: VideoTokenSource | None = None,
            explicit: set[str] = frozenset(),
            notes: tuple[str, ...] = ()) -> tuple[TrainConfig, VideoTokenSource]:
    """Flags -> configs, the dataset (manifests read, no samples) and the derived values.

    ``explicit``: dests of the flags given on the command line (see
    :func:`~localopt_plugin.training.deepspeed_config.reconcile_deepspeed`); ``notes``: what
    the caller changed in ``args`` before (e.g. a resumed checkpoint's kept settings).
    Raises :class:`UserError` naming the flag, file or JSON key to change.
    """
    from localopt_plugin.training.deepspeed_config import reconcile_deepspeed
    from localopt_plugin.training.megatron_flags import resolve_megatron_flags

    flag_notes = [*resolve_megatron_flags(args, explicit), *notes]
    plugin = PluginConfig.from_args(args)
    model = ModelConfig.from_args(args)
    parallel = ParallelConfig.from_args(args)
    parallel.check_model(model)
    if world_size % parallel.model_parallel_size:
        raise UserError(f"world size {world_size} is not divisible by tensor x pipeline x "
                        f"context parallel size {parallel.tensor_model_parallel_size} x "
                        f"{parallel.pipeline_model_parallel_size} x "
                        f"{parallel.context_parallel_size}")
    if parallel.pipeline_model_parallel_size > 1 and parallel.context_parallel_size > 1:
        raise UserError("--context-parallel-size > 1 with --pipeline-model-parallel-size > 1: "
                        "localopt-train pipelines on DeepSpeed's pipeline engine, whose grid "
                        "has no sequence-parallel axis; Megatron-LM's pretrain() (examples/"
                        "pretrain_video_gpt.py) runs both, or use one of them")
    if parallel.pipeline_model_parallel_size > 1 and parallel.sequence_parallel:
        raise UserError("--sequence-parallel with --pipeline-model-parallel-size > 1 is not "
                        "implemented by localopt-train's DeepSpeed pipeline stages; Megatron-LM's "
                        "pretrain() (examples/pretrain_video_gpt.py) runs both, or drop one")
    if parallel.pipeline_model_parallel_size > 1 and model.transformer_impl != "local":
        raise UserError("pipeline parallelism needs --transformer-impl local")
    if parallel.pipeline_model_parallel_size > 1 and model.recompute_granularity == "full":
        raise UserError("--recompute-granularity full recomputes Megatron's transformer block, "
                        "which localopt-train's pipeline stages do not use: use "
                        "--recompute-granularity selective with pipeline parallelism")
    run = RunConfig.from_args(args)
    optimizer = OptimizerConfig.from_args(args)
    if source is None:
        source = plugin.build_dataset()
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
        flag_notes=tuple(flag_notes))
    objective = plugin.build_objective(layout)  # windows against the video length
    config.build_regularizers()
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
    return config, source


def _check_tokenizer(name: str | None, source: VideoTokenSource) -> None:
    """``--tokenizer``: registered, and the one the shards were made with."""
    if name is None:
        return
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
