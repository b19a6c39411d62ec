"""The model's configuration: Megatron-LM's flag names in, Megatron-Core's TransformerConfig out.

:class:`ModelConfig` is the architecture (what a checkpoint must record to rebuild the model);
:class:`ParallelConfig` is the model-parallel layout it is split over. Both are frozen: values
that depend on the data or the DeepSpeed JSON (``max_position_embeddings``, bf16/fp16) are set
once, when the run's configuration is resolved, with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from localopt_plugin.config_flags import FlagConfig, option
from localopt_plugin.errors import UserError

RECOMPUTE_GRANULARITIES = ("selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
RECOMPUTATION = "activation recomputation (Megatron-LM flags)"
PRECISION = "mixed precision (Megatron-LM flags)"


def fields_from(cls: type, source: Any, **overrides: Any) -> dict[str, Any]:
    """The dataclass fields of ``cls`` found as attributes of ``source`` (e.g. parsed args)."""
    values = {f.name: getattr(source, f.name) for f in dataclasses.fields(cls)
              if hasattr(source, f.name)}
    return {**values, **overrides}


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """``cls`` from a saved dict: unknown keys are ignored, missing ones take their defaults,
    so a checkpoint written before a field existed still loads."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def _normalization(value: str) -> str:
    names = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}
    try:
        return names[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from LayerNorm, "
                                         f"RMSNorm)") from None


@dataclass(frozen=True)
class ModelConfig(FlagConfig):
    """A GPT's architecture, initialisation and activation recomputation (Megatron-LM flags,
    with Megatron-LM's defaults)."""

    GROUP: ClassVar[str] = "model (Megatron-LM flags)"

    num_layers: int = option(2, "transformer layers")
    hidden_size: int = option(128, "hidden size")
    num_attention_heads: int = option(4, "attention heads")
    ffn_hidden_size: int | None = option(
        None, "default (Megatron-LM's): 4 x hidden size; with --swiglu int(8 x hidden / 3 / 64) "
        "x 64", type=int)
    kv_channels: int | None = option(None, "channels per head (default: hidden / heads)",
                                     type=int)
    group_query_attention: bool = option(False, "grouped-query attention "
                                         "(--num-query-groups)")
    num_query_groups: int = option(1, "key/value groups with --group-query-attention")
    max_position_embeddings: int | None = option(None, "default: --seq-length", type=int)
    position_embedding_type: str = option("learned_absolute", "positions: a learned table or "
                                          "rotary", choices=("learned_absolute", "rope"))
    rotary_percent: float = option(1.0, "share of each head's channels that rotate")
    rotary_base: int = option(10000, "RoPE base (theta)")
    normalization: str = option("LayerNorm", "LayerNorm or RMSNorm (any case, as "
                                "Megatron-DeepSpeed writes it)", type=_normalization)
    norm_epsilon: float = option(1e-5, "the norms' epsilon")
    swiglu: bool = option(False, "SwiGLU MLP (gated SiLU)")
    disable_bias_linear: bool = option(False, "no biases in the linear layers")
    untie_embeddings_and_output_weights: bool = option(False, "an output layer of its own "
                                                       "(default: the embedding's weight)")
    hidden_dropout: float = option(0.1, "dropout after attention and MLP")
    attention_dropout: float = option(0.1, "dropout of the attention probabilities")
    init_method_std: float = option(0.02, "standard deviation of the initial weights")
    make_vocab_size_divisible_by: int = option(128, "pad the vocabulary to a multiple of this "
                                               "x tensor-parallel size")
    transformer_impl: str = option(
        "local", "local: pure PyTorch layers with SDPA attention; transformer_engine: "
        "TransformerEngine's layers and fused attention (needs TE and a GPU)",
        choices=("local", "transformer_engine"))
    use_cpu_initialization: bool = option(False, "initialise the weights on the CPU")
    recompute_granularity: str | None = option(
        None, "selective: recompute the core attention in backward; full: recompute whole "
        "layers (with --recompute-method and --recompute-num-layers)",
        choices=RECOMPUTE_GRANULARITIES, group=RECOMPUTATION)
    recompute_method: str | None = option(
        None, "full recomputation: uniform (chunks of --recompute-num-layers layers) or block "
        "(the first --recompute-num-layers layers per stage)", choices=RECOMPUTE_METHODS,
        group=RECOMPUTATION)
    recompute_num_layers: int | None = option(None, "layers per recomputed chunk or block",
                                              type=int, group=RECOMPUTATION)
    bf16: bool = option(False, "bf16 mixed precision", group=PRECISION)
    fp16: bool = option(False, "fp16 mixed precision", group=PRECISION)

    EXTRA_FLAGS: ClassVar = (
        (None, ("--seq-length",), dict(type=int, default=None, help="default: the sequence "
                                       "length the dataset produces")),
        (RECOMPUTATION, ("--recompute-activations",), dict(
            action="store_true", help="selective recomputation of the core attention "
            "(= --recompute-granularity selective)")))

    @classmethod
    def from_args(cls, args: argparse.Namespace, **values: Any) -> ModelConfig:
        granularity = getattr(args, "recompute_granularity", None)
        if getattr(args, "recompute_activations", False):
            if granularity not in (None, "selective"):
                raise UserError(f"--recompute-activations means selective recomputation but "
                                f"--recompute-granularity is {granularity}")
            granularity = "selective"
        config = super().from_args(args, recompute_granularity=granularity, **values)
        if config.ffn_hidden_size is None:
            config = dataclasses.replace(config, ffn_hidden_size=default_ffn_hidden_size(
                config.hidden_size, config.swiglu))
        return config

    def validate(self) -> None:
        """Checks that need no process group; each error names the flag to change."""
        if self.bf16 and self.fp16:
            raise UserError("--bf16 and --fp16 are mutually exclusive")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"--hidden-size {self.hidden_size} is not divisible by "
                             f"--num-attention-heads {self.num_attention_heads}")
        if self.group_query_attention and self.num_attention_heads % self.num_query_groups:
            raise UserError(f"--num-attention-heads {self.num_attention_heads} is not "
                             f"divisible by --num-query-groups {self.num_query_groups}")
        if self.recompute_granularity == "full" and (
                self.recompute_method is None or self.recompute_num_layers is None):
            raise UserError("--recompute-granularity full needs --recompute-method "
                             "(uniform or block) and --recompute-num-layers")
        if self.recompute_granularity != "full" and self.recompute_method is not None:
            raise UserError("--recompute-method applies to --recompute-granularity full only")
        if self.recompute_num_layers is not None and not (
                self.recompute_granularity == "full"
                and 1 <= self.recompute_num_layers <= self.num_layers):
            raise UserError(f"--recompute-num-layers {self.recompute_num_layers} needs "
                             f"--recompute-granularity full and a value in [1, --num-layers "
                             f"{self.num_layers}]")

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    @property
    def query_groups(self) -> int:
        return self.num_query_groups if self.group_query_attention else self.num_attention_heads


@dataclass(frozen=True)
class ParallelConfig(FlagConfig):
    """The model-parallel layout (Megatron-LM flags); data parallelism is what remains."""

    GROUP: ClassVar[str] = "parallelism (Megatron-LM flags)"

    tensor_model_parallel_size: int = option(1, "ranks each layer's weights are split over")
    pipeline_model_parallel_size: int = option(1, "ranks the layers are split over")
    context_parallel_size: int = option(1, "split each sample's tokens over this many ranks; "
                                        "attention runs head-sharded (all-to-all): needs "
                                        "--cp-comm-type a2a")
    cp_comm_type: tuple[str, ...] = option(("p2p",), "Megatron's context-parallel "
                                           "communication (p2p is Megatron's ring); the plugin "
                                           "implements a2a (head-sharded, Ulysses)", nargs="+")
    sequence_parallel: bool = option(False, "split norms, dropout and residuals over the "
                                     "tensor-parallel ranks along the sequence")
    distributed_backend: str | None = option(None, "default: nccl with CUDA, gloo without",
                                             choices=("nccl", "gloo"))
    distributed_timeout_minutes: float = option(10, "collective timeout in minutes "
                                                "(Megatron's default)", type=float)

    EXTRA_FLAGS: ClassVar = ((None, ("--local-rank", "--local_rank"), dict(
        dest="local_rank", type=int, default=None, help="set by the deepspeed launcher")),)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **values: Any) -> ParallelConfig:
        config = super().from_args(args, **values)
        if config.distributed_backend == "nccl":
            _check_nccl()
        if config.sequence_parallel and config.tensor_model_parallel_size == 1:
            # Megatron-LM's rule: sequence parallelism splits over TP ranks, so TP=1 turns it off
            return dataclasses.replace(config, sequence_parallel=False)
        return config

    def validate(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{self.flag(name)} must be >= 1, got {getattr(self, name)}")
        self.check_context_parallel()

    def check_world(self, world_size: int) -> None:
        """The world splits into whole model-parallel groups."""
        if world_size % self.model_parallel_size:
            raise UserError(f"world size {world_size} is not divisible by tensor x pipeline x "
                            f"context parallel size {self.tensor_model_parallel_size} x "
                            f"{self.pipeline_model_parallel_size} x "
                            f"{self.context_parallel_size}")

    def check_context_parallel(self) -> None:
        """Context parallelism as the plugin runs it (head-sharded all-to-all)."""
        cp = self.context_parallel_size
        if cp < 1:
            raise UserError(f"--context-parallel-size must be >= 1, got {cp}")
        if cp == 1:
            return
        if set(self.cp_comm_type) != {"a2a"}:
            raise UserError(f"--cp-comm-type {' '.join(self.cp_comm_type)}: the plugin's "
                            f"planned attention runs context parallelism head-sharded "
                            f"(all-to-all) only; Megatron's default p2p (ring), allgather and "
                            f"a2a+p2p are not implemented: pass --cp-comm-type a2a")

    @property
    def model_parallel_size(self) -> int:
        """Ranks that share one sample: tensor x pipeline x context parallel."""
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)

    def check_model(self, model: ModelConfig) -> None:
        """The model splits over this layout."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if model.num_attention_heads % tp:
            raise UserError(f"--num-attention-heads {model.num_attention_heads} is not "
                             f"divisible by --tensor-model-parallel-size {tp}")
        if model.query_groups % tp:
            raise UserError(f"--num-query-groups {model.query_groups} is not divisible by "
                             f"--tensor-model-parallel-size {tp}")
        cp = self.context_parallel_size
        if (model.num_attention_heads // tp) % cp:
            raise UserError(f"--num-attention-heads {model.num_attention_heads} / "
                            f"--tensor-model-parallel-size {tp} does not split over "
                            f"--context-parallel-size {cp} (heads are sharded over its ranks)")
        if self.sequence_parallel and model.transformer_impl != "local":
            raise UserError("--sequence-parallel runs on the local spec's sequence-parallel "
                            "norms here (the TransformerEngine spec's padding is not "
                            "implemented): use --transformer-impl local")
        if cp > 1 and model.transformer_impl != "local":
            raise UserError("--context-parallel-size > 1 runs in the local spec's planned "
                            "attention: use --transformer-impl local")
        if model.num_layers % pp:
            raise UserError(f"--num-layers {model.num_layers} is not divisible by "
                             f"--pipeline-model-parallel-size {pp}")


def _check_nccl() -> None:
    """``--distributed-backend nccl`` needs CUDA GPUs and a torch built with NCCL."""
    import torch.distributed as dist

    from localopt_plugin.platform import cuda_available

    if not (cuda_available() and dist.is_nccl_available()):
        raise UserError("--distributed-backend nccl needs CUDA GPUs and a torch built with "
                        "NCCL, which this machine lacks: use --distributed-backend gloo (or "
                        "leave it out: nccl with CUDA, gloo without)")


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron-LM's default FFN width: 4h, or with SwiGLU two thirds of it (its two input
    projections keep the parameter count) rounded down to a multiple of 64."""
    if not swiglu:
        return 4 * hidden_size
    size = int((4 * hidden_size * 2 / 3) / 64) * 64
    if size < 1:
        raise UserError(f"--swiglu with --hidden-size {hidden_size} gives Megatron-LM's default "
                        f"FFN size 0 (int(8h/3/64)*64): set --ffn-hidden-size")
    return size


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron-LM's padding: a multiple of ``divisible_by x tensor_parallel``."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def transformer_config(model: ModelConfig, parallel: ParallelConfig):
    """Megatron-Core's TransformerConfig for this model and layout."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from localopt_plugin.platform import cuda_available

    dtype = model.params_dtype
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.kv_channels,
        num_query_groups=model.num_query_groups if model.group_query_attention else None,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        layernorm_epsilon=model.norm_epsilon,
        normalization=model.normalization,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=not model.disable_bias_linear,
        init_method_std=model.init_method_std,
        bf16=model.bf16,
        fp16=model.fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        cp_comm_type=parallel.cp_comm_type[0] if parallel.context_parallel_size > 1 else None,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=model.use_cpu_initialization or not cuda_available(),
        recompute_granularity=model.recompute_granularity,
        recompute_method=model.recompute_method,
        recompute_num_layers=model.recompute_num_layers,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
    )
