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
from localopt_plugin.objectives import WindowConfig, build_objective

CONFIG_VERSION = 2  # 1: the flags as a flat dict under "args" (before typed configs)
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and Megatron's LR/weight-decay schedule (Megatron-LM flags)."""

    lr: float = 3e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float | None = None

    @staticmethod
    def add_args(g: argparse._ArgumentGroup) -> None:
        g.add_argument("--lr", type=float, default=3e-4)
        g.add_argument("--min-lr", type=float, default=0.0)
        g.add_argument("--lr-decay-style", default="cosine", choices=LR_DECAY_STYLES)
        g.add_argument("--lr-warmup-iters", type=int, default=0)
        g.add_argument("--lr-decay-iters", type=int, default=None,
                       help="default: --train-iters")
        g.add_argument("--weight-decay", type=float, default=0.01)
        g.add_argument("--adam-beta1", type=float, default=0.9)
        g.add_argument("--adam-beta2", type=float, default=0.999)
        g.add_argument("--adam-eps", type=float, default=1e-8)
        g.add_argument("--clip-grad", type=float, default=None,
                       help="default: the JSON's gradient_clipping, else 1.0")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OptimizerConfig:
        return cls(**fields_from(cls, args))


@dataclass(frozen=True)
class RunConfig:
    """Iterations, batch sizes, checkpoints, logging and the DeepSpeed JSON (Megatron-LM flags
    where Megatron has them)."""

    train_iters: int = 100
    exit_duration_in_mins: float | None = None
    seed: int = 1234
    micro_batch_size: int | None = None
    global_batch_size: int | None = None
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    log_interval: int = 10
    eval_interval: int | None = None
    eval_iters: int = 10
    tensorboard_dir: str | None = None
    metrics_file: str | None = None
    progress: str = "auto"
    deepspeed_config: str | None = None
    zero_stage: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        config = cls(**fields_from(cls, args))
        if config.train_iters < 0 or config.eval_iters < 1 or config.log_interval < 1:
            raise UserError("--train-iters must be >= 0, --eval-iters and --log-interval >= 1")
        return config


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's training, checkpointing and logging flags, and DeepSpeed's."""
    g = parser.add_argument_group("training (Megatron-LM flags)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="default: the DeepSpeed JSON's train_micro_batch_size_per_gpu, else 2")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: the JSON's train_batch_size, else micro batch x data-parallel")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop (after saving, if --save) once training has run this long")
    OptimizerConfig.add_args(g)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)

    g = parser.add_argument_group("checkpointing and logging (Megatron-LM flags)")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--data-path", nargs="*", default=None)
    g.add_argument("--valid-data-path", nargs="*", default=None)

    g = parser.add_argument_group("DeepSpeed")
    g.add_argument("--deepspeed", action="store_true",
                   help="accepted for Megatron-DeepSpeed scripts; DeepSpeed always runs the loop")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   default=None, help="DeepSpeed JSON config (see ds_configs/)")
    g.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3],
                   help="overrides zero_optimization.stage of the JSON")


def add_plugin_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The plugin's own flags: component choices and every registered component's flags
    (windows, ReCo, datasets). Usable as Megatron-LM's ``extra_args_provider``."""
    g = parser.add_argument_group("localopt-plugin")
    g.add_argument("--objective", default="full-sequence",
                   help="training loss, a registered objective: "
                   "full-sequence | local-opt | fewer-frames | ...")
    g.add_argument("--regularizer", nargs="*", default=[],
                   help="registered regularizers added to the loss, e.g. reco")
    g.add_argument("--dataset", default="synthetic-video-tokens",
                   help="registered dataset providing video-token samples")
    g.add_argument("--window-sampler", default="first-frame-balanced",
                   help="registered window sampler for local-opt / fewer-frames")
    registry.add_component_args(parser)
    return parser


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
    objective: str
    window_sampler: str
    window: WindowConfig
    dataset: str
    dataset_config: Any = None
    objective_config: Any = None
    regularizers: tuple[tuple[str, Any], ...] = ()
    seq_length: int = 0
    data_parallel_size: int = 1
    micro_batch_size: int = 2
    global_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    deepspeed: Any = None  # the DeepSpeedSetup (JSON merged with the flags)

    def to_dict(self) -> dict:
        """JSON-ready, versioned: what checkpoints store."""
        def plain(value):
            return json.loads(json.dumps(
                dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value,
                default=str))
        return {
            "version": CONFIG_VERSION,
            "model": plain(self.model), "parallel": plain(self.parallel),
            "optimizer": plain(self.optimizer), "run": plain(self.run),
            "objective": self.objective, "objective_config": plain(self.objective_config),
            "window_sampler": self.window_sampler, "window": plain(self.window),
            "dataset": self.dataset, "dataset_config": plain(self.dataset_config),
            "regularizers": [[name, plain(cfg)] for name, cfg in self.regularizers],
            "seq_length": self.seq_length, "data_parallel_size": self.data_parallel_size,
            "micro_batch_size": self.micro_batch_size,
            "global_batch_size": self.global_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "deepspeed": plain(self.deepspeed.config) if self.deepspeed else None,
        }

    def build_objective(self, layout):
        return build_objective(self.objective, layout, sampler=self.window_sampler,
                               window=self.window, config=self.objective_config,
                               seed=self.run.seed)

    def build_regularizers(self) -> list:
        return [registry.build("regularizer", name, cfg, train_iters=self.run.train_iters)
                for name, cfg in self.regularizers]


def _component(kind: str, name: str, args: argparse.Namespace) -> Any:
    try:
        return registry.config_from_args(kind, name, args)
    except registry.UnknownComponentError as err:
        raise UserError(str(err)) from None


def build_dataset(name: str, config: Any, seed: int) -> VideoTokenSource:
    try:
        return registry.build("dataset", name, config, seed=seed)
    except registry.UnknownComponentError as err:
        raise UserError(str(err)) from None


def resolve(args: argparse.Namespace, world_size: int, source: VideoTokenSource | None = None,
            explicit: set[str] = frozenset()) -> tuple[TrainConfig, VideoTokenSource]:
    """Flags -> configs, the dataset (manifests read, no samples) and the derived values.

    ``explicit``: dests of the flags given on the command line (see
    :func:`~localopt_plugin.training.deepspeed_config.reconcile_deepspeed`).
    Raises :class:`UserError` naming the flag, file or JSON key to change.
    """
    from localopt_plugin.training.deepspeed_config import reconcile_deepspeed

    model = ModelConfig.from_args(args)
    parallel = ParallelConfig.from_args(args)
    parallel.check_model(model)
    if world_size % parallel.model_parallel_size:
        raise UserError(f"world size {world_size} is not divisible by tensor x pipeline "
                        f"parallel size {parallel.tensor_model_parallel_size} x "
                        f"{parallel.pipeline_model_parallel_size}")
    if parallel.pipeline_model_parallel_size > 1 and model.transformer_impl != "local":
        raise UserError("pipeline parallelism needs --transformer-impl local")
    if parallel.pipeline_model_parallel_size > 1 and model.recompute_granularity == "full":
        raise UserError("--recompute-granularity full recomputes Megatron's transformer block, "
                        "which localopt-train's pipeline stages do not use: use "
                        "--recompute-granularity selective with pipeline parallelism")
    run = RunConfig.from_args(args)
    optimizer = OptimizerConfig.from_args(args)
    objective_config = _component("objective", args.objective, args)
    window = _component("window_sampler", args.window_sampler, args) or WindowConfig()
    regularizers = tuple((name, _component("regularizer", name, args))
                         for name in args.regularizer)
    dataset_config = _component("dataset", args.dataset, args)
    if source is None:
        source = build_dataset(args.dataset, dataset_config, run.seed)
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
    config = TrainConfig(
        model=dataclasses.replace(model, bf16=ds.bf16, fp16=ds.fp16),
        parallel=parallel,
        optimizer=dataclasses.replace(optimizer, clip_grad=ds.clip_grad),
        run=run, objective=args.objective, window_sampler=args.window_sampler,
        window=window, dataset=args.dataset, dataset_config=dataset_config,
        objective_config=objective_config, regularizers=regularizers,
        seq_length=seq_length, data_parallel_size=dp,
        micro_batch_size=ds.micro_batch_size, global_batch_size=ds.global_batch_size,
        gradient_accumulation_steps=ds.gradient_accumulation_steps, deepspeed=ds)
    objective = config.build_objective(layout)  # window settings against the video length
    config.build_regularizers()  # the regularizers' own checks
    if parallel.pipeline_model_parallel_size > 1 and any(
            getattr(cfg, "states", "final") == "pre-norm" for _, cfg in regularizers):
        raise UserError("--reco-states pre-norm needs the residual stream before the final "
                        "norm, which DeepSpeed pipeline stages do not pass on: use --reco-states "
                        "final or --pipeline-model-parallel-size 1")
    if (getattr(objective, "sampler", None) is not None and window.scope == "micro-batch"
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
    try:
        registry.get("tokenizer", name)
    except registry.UnknownComponentError as err:
        raise UserError(str(err)) from None
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
