"""Command-line flags: Megatron-LM's names for what Megatron has, one group for the plugin.

``add_megatron_args`` mirrors the subset of Megatron-LM's flags the trainer understands (same
names, same defaults), so an existing launch script works by switching the entry point.
``add_plugin_args`` is the plugin's own group; it has the ``extra_args_provider`` signature, so
it can be handed to Megatron-LM's ``pretrain()`` as is.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from localopt_plugin import registry


def add_megatron_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model (Megatron-LM flags)")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden size")
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--seq-length", type=int, default=None,
                   help="default: the sequence length the dataset produces")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="default: --seq-length")
    g.add_argument("--position-embedding-type", default="learned_absolute",
                   choices=["learned_absolute", "rope"])
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--transformer-impl", default="local",
                   choices=["local", "transformer_engine"],
                   help="local: pure PyTorch layers with SDPA attention; transformer_engine: "
                   "TransformerEngine's spec (needs TE; Local Opt. needs local)")
    g.add_argument("--use-cpu-initialization", action="store_true")

    g = parser.add_argument_group("training (Megatron-LM flags)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="default: the DeepSpeed JSON's train_micro_batch_size_per_gpu, else 2")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: the JSON's train_batch_size, else micro batch x data-parallel")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop (after saving, if --save) once training has run this long")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="cosine",
                   choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=None,
                   help="default: the JSON's gradient_clipping, else 1.0")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)

    g = parser.add_argument_group("parallelism (Megatron-LM flags)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo"],
                   help="default: nccl with CUDA, gloo without")
    g.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                   help="set by the deepspeed launcher")

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
    return parser


def add_plugin_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The plugin's argument group (usable as Megatron-LM's ``extra_args_provider``)."""
    g = parser.add_argument_group("localopt-plugin")
    g.add_argument("--objective", default="full-sequence",
                   help="training loss, a registered objective: "
                   "full-sequence | local-opt | fewer-frames | ...")
    g.add_argument("--regularizer", nargs="*", default=[],
                   help="registered regularizers added to the loss, e.g. reco")
    g.add_argument("--reco-weight", type=float, default=0.1,
                   help="ReCo lambda (the paper's 0.1; 0 disables ReCo at no cost); with "
                   "--reco-weight-schedule adaptive, the weight is capped at 10 x lambda")
    g.add_argument("--reco-pairs", default="adjacent-token",
                   choices=["adjacent-token", "adjacent-frame"],
                   help="ReCo pairs inside the optimized frames: consecutive tokens (i, i+1) "
                   "or the same spatial token in consecutive frames (i, i+P)")
    g.add_argument("--reco-reduction", default="sum", choices=["sum", "mean"],
                   help="over the hidden dimension: sum (the paper's squared L2 norm; its scale "
                   "grows with the hidden size) or mean (scale-free)")
    g.add_argument("--reco-weight-schedule", default="constant",
                   choices=["constant", "linear-warmup", "cosine", "adaptive"],
                   help="ReCo weight over training: constant lambda; linear-warmup 0 -> lambda "
                   "over --reco-warmup-iters; cosine lambda -> 0 over --train-iters; adaptive: "
                   "chosen each step from detached values so that weighted ReCo / LM loss = "
                   "--reco-target-ratio (at most 10 x lambda)")
    g.add_argument("--reco-warmup-iters", type=int, default=0,
                   help="iterations of the linear-warmup ReCo schedule")
    g.add_argument("--reco-target-ratio", type=float, default=0.1,
                   help="adaptive ReCo schedule: weighted ReCo loss / LM loss to hold")
    g.add_argument("--dataset", default="synthetic-video-tokens",
                   help="registered dataset providing video-token samples")
    g.add_argument("--tokenizer", default=None, help="registered video tokenizer")
    g.add_argument("--window-sampler", default="first-frame-balanced",
                   help="registered window sampler for local-opt / fewer-frames")
    g.add_argument("--local-opt-window-frames", type=int, default=2,
                   help="W: latent frames optimized per step")
    g.add_argument("--local-opt-stride-frames", type=int, default=1,
                   help="S: candidate window starts every S frames (S < W overlaps windows)")
    g.add_argument("--local-opt-first-window-prob", type=float, default=0.5,
                   help="p: probability of drawing the window that starts at frame 0")
    g.add_argument("--synthetic-frames", type=int, default=5,
                   help="latent frames per sample of the synthetic dataset")
    g.add_argument("--synthetic-frame-tokens", type=int, default=64,
                   help="tokens per latent frame of the synthetic dataset")
    g.add_argument("--synthetic-codebook-size", type=int, default=512)
    g.add_argument("--synthetic-num-classes", type=int, default=10)
    g.add_argument("--metrics-file", default=None,
                   help="append every iteration's metrics as a JSON line (rank 0)")
    g.add_argument("--dry-run", action="store_true",
                   help="validate flags and the DeepSpeed config, print the resolved setup and "
                   "exit without building the model or touching data (world size from "
                   "$WORLD_SIZE, default 1)")
    g.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress bar (auto: when attached to a terminal)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localopt-train",
        description="Train a Megatron-Core GPT on video tokens with DeepSpeed "
        "(Local Optimization + ReCo).",
        allow_abbrev=False,
    )
    add_megatron_args(parser)
    add_plugin_args(parser)
    from localopt_plugin.data.webdataset_source import add_data_args

    add_data_args(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Checks that need no model or data; each error names the offending flag and value."""
    if args.bf16 and args.fp16:
        raise SystemExit("error: --bf16 and --fp16 are mutually exclusive")
    if args.hidden_size % args.num_attention_heads:
        raise SystemExit(f"error: --hidden-size {args.hidden_size} is not divisible by "
                         f"--num-attention-heads {args.num_attention_heads}")
    if args.num_attention_heads % args.tensor_model_parallel_size:
        raise SystemExit(f"error: --num-attention-heads {args.num_attention_heads} is not "
                         f"divisible by --tensor-model-parallel-size "
                         f"{args.tensor_model_parallel_size}")
    if args.num_layers % args.pipeline_model_parallel_size:
        raise SystemExit(f"error: --num-layers {args.num_layers} is not divisible by "
                         f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}")
    for kind, name in (("objective", args.objective), ("dataset", args.dataset),
                       ("window_sampler", args.window_sampler),
                       *(("regularizer", r) for r in args.regularizer)):
        try:
            registry.get(kind, name)
        except registry.UnknownComponentError as err:
            raise SystemExit(f"error: {err}") from None
    if args.tokenizer is not None:
        try:
            registry.get("tokenizer", args.tokenizer)
        except registry.UnknownComponentError as err:
            raise SystemExit(f"error: {err}") from None


def args_to_json(args: argparse.Namespace) -> str:
    return json.dumps(vars(args), indent=2, sort_keys=True, default=str)
