"""``localopt-bench plan``: what a run needs per GPU and what it costs, before it is launched.

For a model (a preset and Megatron flags), a clip (latent frames x tokens per frame), the window
sampler, the micro-batch, the precision, the ZeRO stage, recomputation and the parallel sizes,
it predicts per-GPU memory and per-step FLOPs of full-sequence, fewer-frames and every Local Opt.
window, the expected Local Opt. speed-up under the sampler, and the largest micro-batch and the
longest clip that fit a GPU. Megatron-LM's ``theoretical_memory_usage.py`` and its FLOP formula
model full sequences; here every cost follows the plan the objective actually builds (the same
``ForwardPlan`` the trainer runs): which tokens run without autograd, which keep keys/values,
which run with autograd, which carry the loss.

Memory is resident state plus the peak of what a step allocates (the step's peak is what
``localopt-bench speed`` measures, above the step's start). Resident: weights and the optimizer's
state (Adam's two moments, and fp32 master weights under bf16), sharded as ZeRO shards them.
During a step the peak is the largest of four moments:

* **the context pass** (Local Opt., no autograd): the keys/values kept so far and one layer's
  transient activations over the context tokens;
* **the output layer's backward**: every layer's saved activations
  (:func:`activation_elements` per token and layer, counted on the local spec), the kept
  context keys/values with the window's own (Local Opt.), the logits' gradient and the output
  weight's gradient;
* **the end of the backward**: every parameter's gradient and the flat copy DeepSpeed's
  bucketed gradient all-reduce makes of them;
* **a recomputed layer's backward** (full recomputation): the saved inputs (and, under
  ``block``, the layers not recomputed), the last chunk's activations rebuilt (one layer under
  ``block``), its gradients and the output layer's.

Context parallelism (``--context-parallel-size N``): every pass's rows split over N ranks
(the planner counts the largest slice), each rank keeping its share of the key/value heads over
the whole context (replicated when fewer than N), ZeRO partitioning over data x context ranks;
FLOPs stay the whole model's. Validated against ``localopt-bench speed --context-parallel-size``
measurements (tests/integration/test_planner.py).

``--measure`` puts measured step peaks beside the predictions. Validated on CPU (fp32,
tests/integration/test_planner.py and docs/planning.md); bf16 and tensor/pipeline parallel
terms follow the same counts at their element sizes and shards, unvalidated until a GPU run
checks them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass

import torch

from localopt_plugin.bench.flops import plan_flops, recompute_flops
from localopt_plugin.bench.speed import fixed_window
from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.errors import UserError
from localopt_plugin.model import ModelConfig, ParallelConfig, padded_vocab_size
from localopt_plugin.objectives import (
    FewerFrames,
    FullSequence,
    LocalOptConfig,
    LocalOptimization,
    WindowConfig,
    WindowSampler,
)
from localopt_plugin.plan import ForwardPlan

GIB = 2**30
# the trainer's layout flags the planner takes (with their defaults, help and rules)
PLANNED_LAYOUT = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                  "context_parallel_size")
ALLREDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce/allreduce bucket size


@dataclass(frozen=True)
class Setup:
    """One planned run (per GPU unless said)."""

    model: ModelConfig
    vocab: int  # the padded vocabulary
    frames: int  # latent frames per clip
    frame_tokens: int
    window: int
    stride: int
    first_prob: float | None
    micro_batch: int = 1
    zero_stage: int = 0
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    context_parallel: int = 1
    num_micro_batches: int = 1  # per step and pipeline (gradient accumulation)
    prefix: int = 3  # BOS, condition, BOV
    windows_per_step: int = 1  # K windows on one context pass

    @property
    def layout(self) -> SampleLayout:
        return SampleLayout(video_start=self.prefix, num_frames=self.frames,
                            frame_tokens=self.frame_tokens)

    @property
    def element(self) -> int:
        """Bytes of an activation and of a gradient."""
        return 2 if self.model.bf16 or self.model.fp16 else 4


def parameter_counts(model: ModelConfig, vocab: int) -> dict[str, int]:
    """Parameters of the embedding, the output layer, one transformer layer and the final norm
    (Megatron-Core's GPTModel: no biases with --disable-bias-linear)."""
    h, f = model.hidden_size, model.ffn_hidden_size or 4 * model.hidden_size
    d = model.kv_channels or h // model.num_attention_heads
    q, kv = model.num_attention_heads * d, model.query_groups * d
    norm = h if model.normalization == "RMSNorm" else 2 * h
    bias = 0 if model.disable_bias_linear else (q + 2 * kv) + h + f * (2 if model.swiglu else 1) + h
    layer = (2 * norm + h * (q + 2 * kv) + q * h + h * f * (2 if model.swiglu else 1) + f * h
             + bias)
    embedding = vocab * h + (model.max_position_embeddings or 0) * h * (
        model.position_embedding_type == "learned_absolute")
    output = vocab * h if model.untie_embeddings_and_output_weights else 0
    return {"embedding": embedding, "output": output, "layer": layer, "final norm": norm}


def key_value_heads(model: ModelConfig, tensor_parallel: int = 1,
                    context_parallel: int = 1) -> int:
    """Key/value heads per tensor-parallel rank, replicated until they split over the
    context-parallel ranks (``model.context_parallel.replicate_groups``)."""
    heads = max(model.query_groups // tensor_parallel, 1)
    return heads * context_parallel // math.gcd(heads, context_parallel)


def activation_elements(model: ModelConfig, tensor_parallel: int = 1,
                        context_parallel: int = 1) -> tuple[float, float]:
    """Elements one layer saves for backward per token: (at the activation dtype, in fp32).

    Counted on the local spec (SDPA attention, SwiGLU, RMSNorm, RoPE): the MLP saves 5 ffn-sized
    tensors (fc1's two halves, the activation's input and output, fc2's input), the attention
    block and the residual stream 10 hidden-sized ones, queries/keys/values after RoPE 3 per
    key/value head, and in fp32 the attention's log-sum-exp per head and each norm's inverse
    RMS. Tensor parallelism shards all but the residual stream and the norms' inputs (4 h).
    Per token of a context-parallel rank's slice the counts stay: the attention's inputs are
    head-sharded over the whole sequence, the same elements, with key/value heads replicated
    when they are fewer than the context-parallel ranks."""
    h, t = model.hidden_size, tensor_parallel
    f = model.ffn_hidden_size or 4 * h
    d = model.kv_channels or h // model.num_attention_heads
    kv_heads = key_value_heads(model, t, context_parallel)
    sharded = 5 * f / t + 6 * h / t + 3 * kv_heads * d
    return 4 * h + sharded, model.num_attention_heads / t + 2


def plan_memory(setup: Setup, plan: ForwardPlan) -> dict[str, float]:
    """Bytes per GPU of one micro-batch's plan: resident state and the step's peak."""
    model, t, pp = setup.model, setup.tensor_parallel, setup.pipeline_parallel
    e = setup.element
    counts = parameter_counts(model, setup.vocab)
    layers = -(-model.num_layers // pp)  # the first stage's (the most)
    per_stage = {  # parameters of the first and the last stage
        "first": counts["embedding"] / t + layers * counts["layer"] / t
        + (counts["output"] / t + counts["final norm"] if pp == 1 else 0),
        "last": (model.num_layers - (pp - 1) * layers) * counts["layer"] / t
        + counts["output"] / t + counts["final norm"],
    }
    params = max(per_stage.values())
    # ZeRO partitions over data x context ranks (DeepSpeed's sequence-parallel groups)
    cp, stage = setup.context_parallel, setup.zero_stage
    shards = setup.data_parallel * cp
    weights = params * e / (shards if stage >= 3 else 1)
    # Adam's moments (fp32), and fp32 master weights when training in bf16/fp16
    optimizer = params * (8 + (4 if e == 2 else 0)) / (shards if stage >= 1 else 1)
    gradients = params * e / (shards if stage >= 2 else 1)

    def rows(length: int) -> int:  # the most rows of a pass one context-parallel rank holds
        return -(-length // cp)

    batch = plan.ids.shape[0]
    pass_tokens = batch * rows(plan.ids.shape[1])
    loss_tokens = batch * min(rows(plan.ids.shape[1]), plan.labels.shape[1])
    context = 0 if plan.context_ids is None else plan.context_ids.shape[1]
    # each context-parallel rank keeps its share of the heads over the whole context
    kept_tokens = batch * (context + plan.ids.shape[1]) if context else 0
    low, fp32 = activation_elements(model, t, cp)
    per_layer = low * e + fp32 * 4
    h = model.hidden_size
    d = model.kv_channels or h // model.num_attention_heads
    kv_heads = key_value_heads(model, t, cp) / cp
    in_flight = min(pp, setup.num_micro_batches) if pp > 1 else 1  # 1F1B on the first stage
    kept = in_flight * layers * kept_tokens * 2 * kv_heads * d * e
    # logits in fp32 with their gradient, and the output layer's input and its gradient
    logits = loss_tokens * 4 * (setup.vocab / t + 4 * h)
    output_grad = counts["output"] / t * e
    if model.recompute_granularity == "full":
        chunk = min(model.recompute_num_layers or 1, layers)
        if model.recompute_method == "uniform":  # every chunk of layers keeps its input only
            inputs, kept_layers, rebuilt = -(-layers // chunk), 0, chunk
        else:  # block: the first `chunk` layers keep their inputs, the others everything
            inputs, kept_layers, rebuilt = chunk, layers - chunk, 1
        saved = in_flight * pass_tokens * (inputs * h * e + kept_layers * per_layer)
        recomputed = pass_tokens * per_layer * rebuilt
    else:
        rebuilt, recomputed = 0, 0.0
        saved = in_flight * pass_tokens * layers * per_layer
    # DeepSpeed all-reduces gradients through flat buckets: a copy of up to a bucket's worth
    bucket = min(gradients, ALLREDUCE_BUCKET_ELEMENTS * e)
    # the no-grad context pass: the kept keys/values and one layer's transients at the MLP
    # (fc1's output, SwiGLU's three intermediates, the residual stream and norms)
    f = model.ffn_hidden_size or 4 * h
    context_pass = kept + batch * rows(context) * (5 * f / t + 4 * h) * e if context else 0.0
    moments = {
        "context pass": context_pass,
        "output layer backward": saved + kept + logits + output_grad,
        # under full recomputation the checkpoints hold the kept keys/values to the end
        "end of backward": gradients + bucket + (kept if recomputed else 0.0),
        # the last chunk rebuilt: only the output layer's and that chunk's gradients exist
        "recomputed layer backward": (saved + kept + recomputed + output_grad
                                      + rebuilt * counts["layer"] / t * e
                                      + 2 * pass_tokens * h * e) if recomputed else 0.0,
    }
    phase = max(moments, key=moments.get)
    return {"parameters": params, "weights": weights, "optimizer state": optimizer,
            "saved activations": saved, "kept keys/values": kept, "logits": logits,
            "gradients": gradients, "step peak": moments[phase], "peak moment": phase,
            "total": weights + optimizer + moments[phase]}


@dataclass
class Estimate:
    name: str
    start: int | None
    flops: float
    recompute_flops: float
    memory: dict[str, float]


def objectives(setup: Setup) -> tuple[SampleLayout, WindowSampler, list]:
    """The planned rows: (name, window start or None, objective), and the sampler whose
    probabilities weigh the windows."""
    layout = setup.layout
    sampler = WindowSampler(setup.frames, setup.window, setup.stride, 0,
                            first_prob=setup.first_prob)
    named = [("full-sequence", None, FullSequence(layout)),
             ("fewer-frames", None, FewerFrames(layout, fixed_window(0, setup.window)))]
    k = setup.windows_per_step
    name = "local-opt, window at frame {}" if k == 1 else f"local-opt, {k} windows at frame {{}}"
    named += [(name.format(s), s, LocalOptimization(layout, fixed_window(s, setup.window),
                                                    LocalOptConfig(windows_per_step=k)))
              for s in sampler.starts]
    return layout, sampler, named


def latest_start_probabilities(probabilities: dict[int, float], k: int) -> dict[int, float]:
    """P(the latest of ``k`` independent draws starts at s): P(latest <= s) = P(start <= s)^k."""
    latest, below = {}, 0.0
    for start in sorted(probabilities):
        latest[start] = (below + probabilities[start]) ** k - below ** k
        below += probabilities[start]
    return latest


def expected_flops(k: int, rows: list[Estimate], one_window_rows: list[Estimate],
                   probabilities: dict[int, float], recompute: bool = False) -> float:
    """FLOPs per step over the window draws. One window: the rows weighed by their
    probabilities. K windows drawn independently: the context pass follows the latest start,
    each window's own pass its start; both parts come from the rows (K windows at s) and the
    one-window rows at s."""
    cost = {r.start: r.flops + (r.recompute_flops if recompute else 0.0) for r in rows}
    if k == 1:
        return sum(probabilities[s] * cost[s] for s in cost)
    one = {r.start: r.flops + (r.recompute_flops if recompute else 0.0) for r in one_window_rows}
    latest = latest_start_probabilities(probabilities, k)
    total = 0.0
    for s in sorted(cost):
        window = (cost[s] - one[s]) / (k - 1)  # one window's own pass at s
        total += latest[s] * (one[s] - window) + k * probabilities[s] * window
    return total


def estimate(setup: Setup) -> list[Estimate]:
    """Every objective's FLOPs and memory per step (per GPU for memory, whole model for FLOPs)."""
    layout, _, named = objectives(setup)
    tokens = torch.zeros(setup.micro_batch, layout.seq_length, dtype=torch.long)
    rows = []
    for name, start, objective in named:
        plan = objective.plan(tokens)
        rows.append(Estimate(name, start, plan_flops(plan, setup.model, setup.vocab),
                             recompute_flops(plan, setup.model), plan_memory(setup, plan)))
    return rows


def summarize(setup: Setup, gpu_bytes: float | None) -> dict:
    _, sampler, _ = objectives(setup)
    rows = estimate(setup)
    full, windows = rows[0], [r for r in rows if r.start is not None]
    probabilities = dict(zip(sampler.starts, sampler.probabilities(), strict=True))
    k = setup.windows_per_step
    one_window = windows if k == 1 else [
        r for r in estimate(dataclasses.replace(setup, windows_per_step=1)) if r.start is not None]
    expected = expected_flops(k, windows, one_window, probabilities)
    expected_hw = expected_flops(k, windows, one_window, probabilities, recompute=True)
    # memory follows the latest window: its draw's distribution weighs the rows
    latest = latest_start_probabilities(probabilities, k)
    worst = max(windows, key=lambda r: r.memory["total"])
    result = {
        "rows": [{"row": r.name, "window start": r.start, "TFLOP per step": r.flops / 1e12,
                  "with recomputation (TFLOP)": (r.flops + r.recompute_flops) / 1e12,
                  "memory (GiB)": {k: v / GIB if isinstance(v, float | int) else v
                                   for k, v in r.memory.items()}} for r in rows],
        "local-opt": {
            "window probabilities": probabilities,
            "windows per step": setup.windows_per_step,
            "expected TFLOP per step": expected / 1e12,
            "expected speed-up (FLOPs)": full.flops / expected,
            "expected speed-up with recomputation (FLOPs)":
                (full.flops + full.recompute_flops) / expected_hw,
            "worst window start": worst.start,
            "worst-window memory (GiB)": worst.memory["total"] / GIB,
            "expected memory (GiB)": sum(latest[r.start] * r.memory["total"]
                                         for r in windows) / GIB,
            "full-sequence memory (GiB)": full.memory["total"] / GIB,
        },
    }
    if gpu_bytes:
        result["fits"] = fits(setup, gpu_bytes)
    return result


def _peaks(setup: Setup) -> tuple[float, float]:
    """(full-sequence, worst Local Opt. window) total bytes per GPU."""
    rows = estimate(setup)
    return rows[0].memory["total"], max(r.memory["total"] for r in rows if r.start is not None)


def fits(setup: Setup, gpu_bytes: float, limit: int = 1024) -> dict:
    """The largest micro-batch (at the clip) and the longest clip in latent frames (at
    micro-batch 1) that fit ``gpu_bytes``, for full-sequence and Local Opt.'s worst window
    (searched up to ``limit``: a value of ``limit`` means at least that)."""
    out = {"GPU memory (GiB)": gpu_bytes / GIB}
    for index, name in enumerate(("full-sequence", "local-opt")):
        def fits_at(index: int = index, **change) -> bool:
            return _peaks(dataclasses.replace(setup, **change))[index] <= gpu_bytes

        out[f"{name}: largest micro-batch"] = _largest(lambda n: fits_at(micro_batch=n), limit)
        out[f"{name}: longest clip (latent frames, micro-batch 1)"] = _largest(
            lambda n: fits_at(frames=n, micro_batch=1), limit, low=max(setup.window + 1, 2))
    return out


def _largest(ok, limit: int, low: int = 1) -> int:
    """The largest n in [low, limit] with ok(n) (ok is monotone), 0 if none."""
    if not ok(low):
        return 0
    high = low
    while high < limit and ok(min(2 * high, limit)):
        high = min(2 * high, limit)
    if high == limit:
        return limit
    top = min(2 * high, limit)  # ok(high), not ok(top)
    while top - high > 1:
        middle = (high + top) // 2
        high, top = (middle, top) if ok(middle) else (high, middle)
    return high


def measure(setup: Setup) -> list[dict]:
    """Predicted against measured step peaks on this machine, for full-sequence and Local Opt.'s
    first and last windows: the real trainer step (a DeepSpeed engine, ZeRO-0) measured as
    ``localopt-bench speed`` measures it, after two steps (the optimizer's state exists)."""
    from localopt_plugin.bench.speed import Row, _engine, _step, peak_allocated_bytes
    from localopt_plugin.platform import default_device
    from localopt_plugin.training.distributed import init_distributed

    if setup.context_parallel > 1:
        raise UserError("--measure runs one process: per-rank peaks under context parallelism "
                        "are measured by localopt-bench speed --context-parallel-size N")
    if setup.tensor_parallel * setup.pipeline_parallel * setup.data_parallel > 1 or (
            setup.zero_stage):
        raise UserError("--measure runs one process with ZeRO-0: drop the parallel sizes and "
                        "--zero-stage")
    init_distributed(seed=1234)
    model = dataclasses.replace(setup.model, max_position_embeddings=setup.layout.input_length)
    engine = _engine(model, setup.vocab, 1234)
    _, _, named = objectives(setup)
    predicted = estimate(setup)
    tokens = torch.randint(0, setup.vocab, (setup.micro_batch, setup.layout.seq_length),
                           device=default_device())
    out = []
    for index in (0, 2, len(named) - 1):  # full-sequence, the first and the last window
        name, start, objective = named[index]
        row = Row(name, engine, objective, 0, start)
        for iteration in range(2):
            _step(row, tokens, iteration)
        peak = peak_allocated_bytes(lambda r=row: _step(r, tokens, 0))
        memory = predicted[index].memory
        out.append({"row": name, "predicted step peak (MiB)": memory["step peak"] / 2**20,
                    "measured step peak (MiB)": peak / 2**20,
                    "ratio": memory["step peak"] / peak, "peak moment": memory["peak moment"]})
    return out


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="110m", help="a model preset (localopt_plugin/model/"
                        "presets.py)")
    parser.add_argument("--model-flags", default="",
                        help="Megatron model flags over the preset, e.g. "
                        "'--recompute-granularity full --recompute-method uniform "
                        "--recompute-num-layers 1'")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 mixed precision (weights, activations and gradients in bf16, "
                        "fp32 master weights and Adam moments)")
    parser.add_argument("--frames", type=int, default=5, help="latent frames per clip (a clip "
                        "of 1 + 4k frames has 1 + k)")
    parser.add_argument("--frame-tokens", type=int, default=256,
                        help="tokens per latent frame (16x16 grid: 256)")
    parser.add_argument("--vocab", type=int, default=16384,
                        help="the tokenizer's vocabulary (padded as Megatron pads it)")
    WindowConfig.add_args(parser, only=("window_frames", "stride_frames", "first_window_prob"))
    LocalOptConfig.add_args(parser, only=("windows_per_step",))
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--num-micro-batches", type=int, default=1,
                        help="micro-batches per step (gradient accumulation: pipeline in flight)")
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    ParallelConfig.add_args(parser, only=PLANNED_LAYOUT)
    parser.add_argument("--data-parallel-size", type=int, default=1)
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="also report the largest micro-batch and clip that fit this much")
    parser.add_argument("--measure", action="store_true",
                        help="also measure the step peaks of full-sequence and the first and "
                        "last windows on this machine (one process) beside the predictions")
    parser.add_argument("--json", default=None, help="write the results here")


def setup_from_args(args: argparse.Namespace) -> Setup:
    """The planned run from the bench's flags, checked by the trainer's own rules (windows,
    layout against the model)."""
    from localopt_plugin.model.presets import config_with_flags

    if min(args.data_parallel_size, args.micro_batch_size, args.num_micro_batches, args.frames,
           args.frame_tokens) < 1:
        raise UserError("sizes, frames and micro-batches must be >= 1")
    model = config_with_flags(args.preset, args.model_flags, bf16=args.bf16)
    # the plugin runs context parallelism head-sharded (a2a): what a trained layout gives
    parallel = ParallelConfig.from_args(args, cp_comm_type=("a2a",))
    parallel.check_model(model)
    window = WindowConfig.from_args(args)
    window.validate(args.frames)
    local_opt = LocalOptConfig.from_args(args)
    tp = parallel.tensor_model_parallel_size
    vocab = padded_vocab_size(args.vocab, model.make_vocab_size_divisible_by, tp)
    return Setup(model=model, vocab=vocab, frames=args.frames, frame_tokens=args.frame_tokens,
                 window=window.window_frames, stride=window.stride_frames,
                 first_prob=window.first_window_prob,
                 micro_batch=args.micro_batch_size, zero_stage=args.zero_stage,
                 tensor_parallel=tp, pipeline_parallel=parallel.pipeline_model_parallel_size,
                 data_parallel=args.data_parallel_size,
                 context_parallel=parallel.context_parallel_size,
                 num_micro_batches=args.num_micro_batches,
                 windows_per_step=local_opt.windows_per_step)


def format_table(setup: Setup, result: dict) -> str:
    m = setup.model
    lines = [f"{m.num_layers} layers x {m.hidden_size}, vocab {setup.vocab}, "
             f"{'bf16' if setup.element == 2 else 'fp32'}, recompute "
             f"{m.recompute_granularity or 'none'}; clip {setup.frames} latent frames x "
             f"{setup.frame_tokens} tokens, micro-batch {setup.micro_batch}, window "
             f"{setup.window}/stride {setup.stride}, ZeRO-{setup.zero_stage}, TP "
             f"{setup.tensor_parallel} PP {setup.pipeline_parallel} CP {setup.context_parallel} "
             f"DP {setup.data_parallel}",
             *(["note: activations are counted on the local spec; TransformerEngine's layers "
                "save other tensors (unvalidated)"] if m.transformer_impl != "local" else []),
             "| row | TFLOP/step | with recompute | weights+optimizer (GiB) | step peak (GiB) "
             "| peak moment | total (GiB) |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        mem = row["memory (GiB)"]
        lines.append(f"| {row['row']} | {row['TFLOP per step']:.4g} | "
                     f"{row['with recomputation (TFLOP)']:.4g} | "
                     f"{mem['weights'] + mem['optimizer state']:.3g} | {mem['step peak']:.3g} | "
                     f"{mem['peak moment']} | {mem['total']:.3g} |")
    local = result["local-opt"]
    lines.append(f"local-opt: expected speed-up {local['expected speed-up (FLOPs)']:.2f}x "
                 f"(FLOPs; {local['expected speed-up with recomputation (FLOPs)']:.2f}x with "
                 f"recomputation), worst window (start {local['worst window start']}) "
                 f"{local['worst-window memory (GiB)']:.3g} GiB, expected "
                 f"{local['expected memory (GiB)']:.3g} GiB, full-sequence "
                 f"{local['full-sequence memory (GiB)']:.3g} GiB")
    for row in result.get("measured", []):
        lines.append(f"measured {row['row']}: step peak {row['measured step peak (MiB)']:.4g} "
                     f"MiB, predicted {row['predicted step peak (MiB)']:.4g} MiB "
                     f"({row['ratio']:.3f}x, {row['peak moment']})")
    for key, value in result.get("fits", {}).items():
        lines.append(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    setup = setup_from_args(args)
    result = summarize(setup, args.gpu_memory_gib * GIB if args.gpu_memory_gib else None)
    result["settings"] = {k: v for k, v in vars(args).items() if k != "json"}
    if args.measure:
        result["measured"] = measure(setup)
    print(format_table(setup, result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
