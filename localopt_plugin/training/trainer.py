"""The training loop: a DeepSpeed engine around a Megatron-Core GPTModel and a registered objective.

DeepSpeed owns the optimizer step (ZeRO 0-3, gradient accumulation, clipping, bf16/fp16) and
steps Megatron-Core's own LR/weight-decay scheduler; the plugin supplies the loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from localopt_plugin import registry
from localopt_plugin.arguments import args_to_json
from localopt_plugin.data import VideoTokenSource
from localopt_plugin.model import build_gpt_model, padded_vocab_size
from localopt_plugin.objectives.sequence import FullSequence, build_objective
from localopt_plugin.platform import cuda_available, default_device
from localopt_plugin.regularizers import apply_regularizers
from localopt_plugin.training.distributed import (
    MegatronMpu,
    data_parallel_rank,
    data_parallel_size,
    init_distributed,
    is_rank0,
)
from localopt_plugin.training.ds_config import build_deepspeed_config
from localopt_plugin.training.metrics import MetricsLogger

log = logging.getLogger("localopt_plugin.train")


class TrainingStep(torch.nn.Module):
    """The module DeepSpeed wraps: the GPT plus the objective and regularizers computing the loss.

    forward returns the total loss and a dict of detached scalars to log.
    """

    def __init__(self, model: torch.nn.Module, objective, regularizers=()) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.regularizers = list(regularizers)

    def forward(self, tokens: torch.Tensor, iteration: int, micro_batch: int):
        out = self.objective(self.model, tokens, iteration, micro_batch)
        total, reg_metrics = apply_regularizers(out, self.regularizers, iteration)
        return total, {"lm loss": out.loss.detach(), **out.metrics, **reg_metrics}, (
            out.num_tokens)


def _param_groups(model: torch.nn.Module) -> list[dict]:
    """Megatron's grouping: no weight decay on biases and norm weights (wd_mult 0)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]


class MegatronLRScheduler:
    """Megatron-Core's OptimizerParamScheduler with the ``step()`` DeepSpeed calls."""

    def __init__(self, optimizer, args: argparse.Namespace) -> None:
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        decay_iters = args.lr_decay_iters or args.train_iters
        self.inner = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0 if args.lr_warmup_iters else args.lr,
            max_lr=args.lr,
            min_lr=args.min_lr,
            lr_warmup_steps=args.lr_warmup_iters,
            lr_decay_steps=max(decay_iters, args.lr_warmup_iters + 1),
            lr_decay_style=args.lr_decay_style,
            start_wd=args.weight_decay,
            end_wd=args.weight_decay,
            wd_incr_steps=max(decay_iters, 1),
            wd_incr_style="constant",
            wsd_decay_steps=max(decay_iters // 10, 1) if args.lr_decay_style == "WSD" else None,
            lr_wsd_decay_style="linear" if args.lr_decay_style == "WSD" else None,
        )

    def step(self, increment: int = 1) -> None:
        self.inner.step(increment)

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.inner.optimizer.param_groups]

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0


def prepare_data(args: argparse.Namespace) -> VideoTokenSource:
    """The registered dataset, with the sequence length and manifest checked against the flags."""
    source: VideoTokenSource = registry.build("dataset", args.dataset, args=args)
    layout = source.layout
    args.seq_length = args.seq_length or layout.input_length
    if args.seq_length < layout.input_length:
        raise SystemExit(f"error: --seq-length {args.seq_length} is shorter than the dataset's "
                         f"samples ({layout.input_length} input tokens)")
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    if "manifest" in source.info:
        from localopt_plugin.data.manifest import check_manifest_against_model

        check_manifest_against_model(
            source.info["manifest"],
            padded_vocab_size(source.vocab.size, args.make_vocab_size_divisible_by,
                              args.tensor_model_parallel_size),
            args.seq_length)
    return source


def setup(args: argparse.Namespace):
    """Process groups, data source, model, objective and DeepSpeed engine."""
    import deepspeed

    init_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                     args.seed, args.distributed_backend)
    source = prepare_data(args)
    layout = source.layout
    ds_config = build_deepspeed_config(args, data_parallel_size())
    objective = build_objective(args, layout)  # validates the window settings before any work

    regularizers = [registry.build("regularizer", name, args=args) for name in args.regularizer]
    if args.pipeline_model_parallel_size > 1:
        from localopt_plugin.model.pipeline import build_pipeline_model

        if args.transformer_impl != "local":
            raise SystemExit("error: pipeline parallelism needs --transformer-impl local")
        module = build_pipeline_model(args, source.vocab.size, regularizers)
        mpu = None  # the PipelineModule brings its own grid (same rank layout as Megatron's)
    else:
        model = build_gpt_model(args, vocab_size=source.vocab.size)
        module = TrainingStep(model, objective, regularizers)
        mpu = MegatronMpu()
        if ds_config["zero_optimization"]["stage"] == 3 and (
                model.share_embeddings_and_output_weights):
            # The output layer uses the embedding's (ZeRO-3 partitioned) weight.
            deepspeed.zero.register_external_parameter(
                model.output_layer, model.shared_embedding_or_output_weight())
    optimizer = torch.optim.AdamW(
        _param_groups(module), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_eps, weight_decay=args.weight_decay,
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=lambda opt: MegatronLRScheduler(opt, args),
        config=ds_config,
        mpu=mpu,
    )
    return engine, scheduler, source, objective


def _rng_file(directory: str, tag: str) -> str:
    return os.path.join(directory, tag, f"rng_state_rank{dist.get_rank():05d}.pt")


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if cuda_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if cuda_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, args: argparse.Namespace, state: TrainState,
                    source: VideoTokenSource) -> None:
    """DeepSpeed checkpoint (model, optimizer, LR scheduler) + loader position + RNG per rank.

    The window sampler needs no state: its draws are a function of (seed, iteration). The flags,
    vocabulary and sample layout are stored too, so generation can rebuild the model from the
    checkpoint alone (see ``localopt_plugin.training.convert``).
    """
    tag = f"iter_{state.iteration:07d}"
    engine.save_checkpoint(
        args.save, tag=tag,
        client_state={"iteration": state.iteration, "consumed_samples": state.consumed_samples,
                      "world_size": dist.get_world_size(),
                      "args": json.loads(args_to_json(args)),
                      "vocabulary": dataclasses.asdict(source.vocab),
                      "layout": dataclasses.asdict(source.layout),
                      "data_info": json.loads(json.dumps(
                          source.info, default=lambda o: dataclasses.asdict(o)
                          if dataclasses.is_dataclass(o) else str(o)))},
    )
    torch.save(_rng_state(), _rng_file(args.save, tag))
    dist.barrier()
    if is_rank0():
        log.info("saved checkpoint %s/%s", args.save, tag)


def load_checkpoint(engine, args: argparse.Namespace) -> TrainState:
    path, client = engine.load_checkpoint(args.load)
    if path is None:
        if is_rank0():
            log.warning("no checkpoint found in --load %s; starting from scratch", args.load)
        return TrainState()
    tag = f"iter_{client['iteration']:07d}"
    rng_file = _rng_file(args.load, tag)
    if os.path.exists(rng_file) and client.get("world_size") == dist.get_world_size():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    elif is_rank0():
        log.warning("RNG states not restored (saved with world size %s, now %d): dropout "
                    "masks will differ from an uninterrupted run", client.get("world_size"),
                    dist.get_world_size())
    if is_rank0():
        log.info("resumed from %s at iteration %d (%d samples consumed)", path,
                 client["iteration"], client["consumed_samples"])
    return TrainState(client["iteration"], client["consumed_samples"])


def _is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def _pipe_group():
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group()


def _last_stage_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_last_rank()


@torch.no_grad()
def evaluate(engine, source: VideoTokenSource, args: argparse.Namespace) -> float:
    """Full-sequence validation loss (whatever the training objective), averaged over ranks."""
    if source.valid is None:
        return float("nan")
    full = FullSequence(source.layout)
    stream = source.valid.batches(args.micro_batch_size, data_parallel_rank(),
                                  data_parallel_size(), args.seed)
    device = default_device()
    engine.eval()
    if _is_pipeline(engine):
        from localopt_plugin.model.pipeline import plan_to_pipe

        loss_fn = engine.module.loss_fn
        loss_fn.evaluating = True
        batches = (plan_to_pipe(full.plan(next(stream)["tokens"]))
                   for _ in range(args.eval_iters))
        total = torch.zeros((), device=device)
        for _ in range(args.eval_iters // args.gradient_accumulation_steps or 1):
            total += engine.eval_batch(batches, reduce_output="avg").float().to(device).sum()
        total /= args.eval_iters // args.gradient_accumulation_steps or 1
        loss_fn.evaluating = False
    else:
        total = torch.zeros((), device=device)
        for _ in range(args.eval_iters):
            tokens = next(stream)["tokens"].to(device)
            total += full(engine.module.model, tokens).loss.float()
        total /= args.eval_iters
    engine.train()
    dist.all_reduce(total, group=_dp_group())
    return total.item() / data_parallel_size()


def _grad_norm_before_step(engine) -> float | None:
    """DeepSpeed reports no norm for fp32 ZeRO-0 (it discards the clip's); compute it there."""
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None  # the engine's optimizer records it during step()
    from deepspeed.runtime.utils import get_global_norm_of_tensors
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    # Count parameters replicated across tensor-parallel ranks (norms, row-parallel biases,
    # position embeddings) once, as Megatron does: the mpu sum adds every rank's norm.
    grads = [p.grad for p in engine.module.parameters()
             if p.grad is not None and param_is_not_tensor_parallel_duplicate(p)]
    return float(get_global_norm_of_tensors(grads, mpu=engine.mpu))


def _dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def _data_parallel_step(engine, stream, args, iteration: int) -> dict[str, float]:
    """Gradient accumulation over micro-batches; returns the micro-batch-averaged metrics."""
    sums: dict[str, float] = {}
    grad_norm = None
    for micro in range(args.gradient_accumulation_steps):
        tokens = next(stream)["tokens"].to(default_device(), non_blocking=True)
        loss, metrics, _ = engine(tokens, iteration, micro)
        engine.backward(loss)
        if micro == args.gradient_accumulation_steps - 1:
            grad_norm = _grad_norm_before_step(engine)
        engine.step()
        metrics["total loss"] = loss.detach()
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    record = {k: v / args.gradient_accumulation_steps for k, v in sums.items()}
    record["grad norm"] = grad_norm if grad_norm is not None else engine.get_global_grad_norm()
    return record


def _pipeline_step(engine, stream, objective, args, iteration: int) -> dict[str, float]:
    """One DeepSpeed pipeline train_batch; metrics travel from the last stage to all stages."""
    from localopt_plugin.model.pipeline import plan_to_pipe

    loss_fn = engine.module.loss_fn
    loss_fn.iteration, loss_fn.metrics = iteration, []
    batches = (plan_to_pipe(objective.plan(next(stream)["tokens"], iteration, micro))
               for micro in range(args.gradient_accumulation_steps))
    engine.train_batch(data_iter=batches)
    record = None
    if engine.is_last_stage():
        record = {k: sum(m[k] for m in loss_fn.metrics) / len(loss_fn.metrics)
                  for k in loss_fn.metrics[0]}
    box = [record]
    dist.broadcast_object_list(box, src=_last_stage_rank(), group=_pipe_group())
    record = box[0]
    record["grad norm"] = engine.get_global_grad_norm()
    return record


def _time_is_up(args: argparse.Namespace, started: float) -> bool:
    """Megatron's --exit-duration-in-mins, decided on rank 0 so that every rank stops together."""
    if args.exit_duration_in_mins is None:
        return False
    done = torch.tensor([time.perf_counter() - started > 60 * args.exit_duration_in_mins])
    dist.broadcast(done, src=0)
    return bool(done.item())


def train(args: argparse.Namespace) -> dict:
    """Run training; returns the logged records and the final state (for callers and tests)."""
    engine, scheduler, source, objective = setup(args)
    state = load_checkpoint(engine, args) if args.load else TrainState()
    stream = source.train.batches(args.micro_batch_size, data_parallel_rank(),
                                  data_parallel_size(), args.seed, state.consumed_samples)
    logger = MetricsLogger(args, start_iteration=state.iteration)
    tokens_per_sample = source.layout.num_frames * source.layout.frame_tokens
    pipeline = _is_pipeline(engine)
    history: list[dict] = []
    started = time.perf_counter()
    while state.iteration < args.train_iters and not _time_is_up(args, started):
        start = time.perf_counter()
        if pipeline:
            record = _pipeline_step(engine, stream, objective, args, state.iteration)
        else:
            record = _data_parallel_step(engine, stream, args, state.iteration)
        grad_norm = record.pop("grad norm")
        names = sorted(record)
        averaged = torch.tensor([record[k] for k in names], dtype=torch.float64)
        dist.all_reduce(averaged, group=_dp_group())
        averaged /= data_parallel_size()
        state.iteration += 1
        state.consumed_samples += args.global_batch_size
        step_time = time.perf_counter() - start
        record = dict(zip(names, averaged.tolist(), strict=True))
        record.update({
            "iteration": state.iteration,
            "lr": scheduler.get_last_lr()[0],
            "grad norm": float("nan") if grad_norm is None else float(grad_norm),
            "step time (s)": step_time,
            "video tokens/s": args.global_batch_size * tokens_per_sample / step_time,
        })
        if args.eval_interval and state.iteration % args.eval_interval == 0:
            record["valid full-sequence loss"] = evaluate(engine, source, args)
        history.append(record)
        logger.log(record)
        if args.save and args.save_interval and state.iteration % args.save_interval == 0:
            save_checkpoint(engine, args, state, source)
    if args.save and (not args.save_interval or state.iteration % args.save_interval):
        save_checkpoint(engine, args, state, source)
    logger.close()
    return {"history": history, "state": state}


def configure_logging() -> None:
    level = os.environ.get("LOCALOPT_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level if is_rank0() else "WARNING",
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    if not cuda_available():
        logging.getLogger("DeepSpeed").setLevel("WARNING")
