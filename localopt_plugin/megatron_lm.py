"""Megatron-LM integration: the plugin's objectives inside an existing pretrain_gpt-style script.

Megatron-LM's ``pretrain()`` takes four things from a training script; this module provides
each of them for video-token training (docs/megatron-lm.md shows the lines to change):

* :func:`extra_args_provider` adds the plugin's flags (objective, ReCo, window sampling,
  dataset) to Megatron-LM's parser;
* :func:`model_provider` builds Megatron-Core's ``GPTModel`` with the plugin's layer spec and
  layout-independent initialisation, with the **dataset's** vocabulary, from the
  ``TransformerConfig`` Megatron-LM derives from its flags (recomputation included);
* :class:`LocalOptForwardStep` is the ``forward_step_func``: it turns each micro-batch into the
  objective's :class:`~localopt_plugin.plan.ForwardPlan` (Local Opt.: a context pass under
  ``no_grad`` then the window pass) and returns ``(output, loss_func)`` in Megatron-Core's
  contract, ``loss_func`` giving ``(summed_loss, num_tokens, report)`` with pretrain_gpt's
  NaN/Inf and spiky-loss checks; in evaluation it computes the full-sequence loss;
* :func:`train_valid_test_datasets_provider` streams micro-batches of the registered dataset
  for ``--dataloader-type external``; without validation data it turns Megatron's evaluation
  off (``--eval-iters 0``) instead of letting it read from nothing.

:func:`pretrain` calls the installed Megatron-LM's ``pretrain()`` (0.16-0.19 signatures) with
these providers and **without** a model config, so that Megatron-LM calls the plugin's
``model_provider`` rather than building its own model.

Pipeline parallelism (``--pipeline-model-parallel-size``, also interleaved). Megatron's
schedules pass one tensor between stages, so Local Opt.'s two streams travel in it, the context
rows (run under ``no_grad``) before the window rows (:func:`~localopt_plugin.plan.plan_hidden`).
Every stage derives the micro-batch's plan itself (window draws are a function of iteration and
global micro-batch; a middle stage reads no data and plans on placeholder tokens of the
sample's shape). The rows per micro-batch vary with the window (and no plan has exactly
``--seq-length`` rows), so :func:`model_provider` turns on Megatron's ``variable_seq_lengths``
under pipeline parallelism (stages exchange shapes first; Megatron-LM has no flag for it).
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_attr_wrapped_model

from localopt_plugin.data.source import BatchSource, VideoTokenSource
from localopt_plugin.errors import UserError
from localopt_plugin.metric_names import TOTAL_LOSS, VALID_LOSS
from localopt_plugin.model import (
    ModelConfig,
    ParallelConfig,
    build_gpt_model,
    final_norm_input,
    padded_vocab_size,
)
from localopt_plugin.model.context_parallel import SequenceShard
from localopt_plugin.objectives import (
    FullSequence,
    global_micro_batch,
)
from localopt_plugin.plan import (
    ForwardPlan,
    objective_output,
    optimized_outputs,
    plan_hidden,
)
from localopt_plugin.platform import apply_megatron_lm_shims, cuda_available, default_device
from localopt_plugin.plugin import (
    PluginConfig,
    PluginParts,
    add_plugin_args,
    keep_recorded_settings,
)
from localopt_plugin.regularizers import apply_regularizers

log = logging.getLogger(__name__)

SPIKY_LOSS_FACTOR = 10  # pretrain_gpt.py's threshold for a spiky loss
# Megatron-LM's fusions (on by default): the flag that turns each off, and what it reads on
# ``args``; on a GPU, the module the local spec needs for it (None: the local spec has it)
FUSIONS = (("--no-persist-layer-norm", lambda a: not getattr(a, "no_persist_layer_norm", True),
            "apex"),  # the local spec's torch norm asserts it off
           ("--no-masked-softmax-fusion", lambda a: getattr(a, "masked_softmax_fusion", False),
            None),
           ("--no-bias-gelu-fusion", lambda a: getattr(a, "bias_gelu_fusion", False), None),
           ("--no-bias-swiglu-fusion", lambda a: getattr(a, "bias_swiglu_fusion", False), None),
           ("--no-bias-dropout-fusion", lambda a: getattr(a, "bias_dropout_fusion", False),
            None),
           ("--no-gradient-accumulation-fusion",
            lambda a: getattr(a, "gradient_accumulation_fusion", False),
            "fused_weight_gradient_mlp_cuda"),  # APEX's kernel; TE's linears have their own
           ("--no-rope-fusion", lambda a: getattr(a, "apply_rope_fusion", False),
            "transformer_engine"))  # Megatron's fused RoPE is TE's, under either spec


def missing_fused_kernels(args: argparse.Namespace) -> list[str]:
    """The flags that turn off the Megatron-LM fusions this run asks for but this machine
    lacks the kernels of: every one without CUDA; on a GPU, RoPE fusion without
    TransformerEngine, and persistent layer norm and gradient-accumulation fusion under the
    local spec without APEX (each would otherwise stop the run deep inside Megatron)."""
    on = [(flag, needs) for flag, enabled, needs in FUSIONS if enabled(args)]
    if not cuda_available():
        return [flag for flag, _ in on]
    local = getattr(args, "transformer_impl", "local") == "local"
    return [flag for flag, needs in on if needs is not None
            and (local or needs == "transformer_engine")
            and importlib.util.find_spec(needs) is None]


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The plugin's flags for Megatron-LM's parser (``--data-path`` is Megatron's own)."""
    return add_plugin_args(parser)


def megatron_args() -> argparse.Namespace:
    """Megatron-LM's parsed arguments (``megatron.training`` must be installed)."""
    try:
        from megatron.training import get_args
    except ImportError as err:
        raise RuntimeError(f"Megatron-LM's megatron.training is not installed ({err}); it comes "
                           "with megatron-core >= 0.17 (Python >= 3.12)") from None
    return get_args()


def _training_iteration() -> int | None:
    """Megatron-LM's ``args.curr_iteration`` when a Megatron-LM run is in progress."""
    try:
        from megatron.training.global_vars import get_args
        return getattr(get_args(), "curr_iteration", None)
    except (ImportError, AssertionError):  # not installed / args not parsed
        return None


# The plugin of the namespace Megatron-LM parsed last: (args, plugin config, parts). Not kept on
# args itself: Megatron-LM pickles args into every checkpoint.
_SETUP: tuple[argparse.Namespace, PluginConfig, PluginParts] | None = None


def plugin_setup(args: argparse.Namespace) -> tuple[PluginConfig, PluginParts]:
    """The plugin's configuration and parts (dataset, objective checked against its layout,
    regularizers) from Megatron-LM's flags, built once per parsed namespace: the providers and
    the forward step all use these. A run resuming from ``--load`` keeps its checkpoint's
    regularizer settings (see :func:`keep_checkpoint_settings`)."""
    global _SETUP
    if _SETUP is None or _SETUP[0] is not args:
        check_megatron_config(args)
        keep_checkpoint_settings(args)
        plugin = PluginConfig.from_args(args, _given_dests())
        if getattr(plugin.window, "learns_from_losses", False):
            raise UserError(f"--window-sampler {plugin.window_sampler} learns from each step's "
                            "loss, which pretrain() does not feed back to the plugin: train "
                            "with localopt-train, or use first-frame-balanced")
        _SETUP = (args, plugin, plugin.build(args.train_iters))
    return _SETUP[1], _SETUP[2]


def _given_dests() -> set[str]:
    """The dests of the flags on this process's command line (Megatron-LM parses sys.argv)."""
    return {token[2:].split("=")[0].replace("-", "_") for token in sys.argv[1:]
            if token.startswith("--")}


def keep_checkpoint_settings(args: argparse.Namespace) -> list[str]:
    """With ``--load``, the regularizer settings recorded in the checkpoint's saved arguments
    are kept for every flag not on the command line (as ``localopt-train`` does), so a resumed
    run trains the form it started with even where a default changed; one line per kept
    setting. Read with Megatron-LM's own ``load_args_from_checkpoint`` (no process group)."""
    if not getattr(args, "load", None):
        return []
    from megatron.training.checkpointing import load_args_from_checkpoint

    loaded = load_args_from_checkpoint(copy.deepcopy(args))
    if not isinstance(loaded, tuple):  # no checkpoint (yet) in --load
        return []
    notes = keep_recorded_settings(args, vars(loaded[1]), _given_dests())
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"localopt-plugin: {note}", flush=True)
    return notes


def video_source(args: argparse.Namespace) -> VideoTokenSource:
    """The registered dataset named by ``--dataset`` (see :func:`plugin_setup`)."""
    return plugin_setup(args)[1].source


# ----------------------------------------------------------------------------------- model


def build_model(args: argparse.Namespace, config: TransformerConfig, vocab_size: int,
                pre_process: bool = True, post_process: bool = True,
                vp_stage: int | None = None) -> GPTModel:
    """GPTModel (one pipeline stage) from Megatron-LM flags and a TransformerConfig."""
    model = build_gpt_model(ModelConfig.from_args(args), vocab_size,
                            parallel=ParallelConfig.from_args(args), seed=args.seed,
                            pre_process=pre_process, post_process=post_process,
                            megatron_config=config, vp_stage=vp_stage)
    model.model_type = ModelType.encoder_or_decoder  # what Megatron-LM's get_model sets
    return model


def check_megatron_config(args: argparse.Namespace) -> None:
    """Refuse, naming the flag, what the plugin's model would otherwise drop silently and
    fusions that would stop the run deep inside Megatron."""
    if getattr(args, "mtp_num_layers", None):
        raise UserError("--mtp-num-layers (multi-token prediction) is not supported by the "
                        "plugin's objectives; drop it")
    missing = missing_fused_kernels(args)
    if missing:
        where = "without CUDA" if not cuda_available() else "without the kernels they need"
        raise UserError(f"Megatron-LM's fusions cannot run on this machine ({where}); add "
                        + " ".join(missing))


def model_provider(pre_process: bool = True, post_process: bool = True,
                   vp_stage: int | None = None, config: TransformerConfig | None = None,
                   pg_collection: Any = None) -> GPTModel:
    """Megatron-LM's ``model_provider`` contract; vocabulary size from the dataset.

    Megatron-LM's own ``args.padded_vocab_size`` (from ``--vocab-size`` and its tokenizer) is
    replaced by the dataset's, so that its logs and FLOP counts describe the trained model."""
    args = megatron_args()
    # the plugin's setup (its checks: before Megatron's TransformerConfig raises on a fusion)
    vocab = video_source(args).vocab.size
    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args

        config = core_transformer_config_from_args(args)
    if args.pipeline_model_parallel_size > 1:
        # the rows crossing stages vary with the drawn window, and a plan's rows are not
        # --seq-length (full-sequence runs the sample's input up to its last video token)
        config.variable_seq_lengths = True
    args.padded_vocab_size = padded_vocab_size(vocab, args.make_vocab_size_divisible_by,
                                               args.tensor_model_parallel_size)
    return build_model(args, config, vocab, pre_process, post_process, vp_stage)


# ------------------------------------------------------------------------------ forward


def _report(value: torch.Tensor | float, num_tokens: torch.Tensor) -> torch.Tensor:
    """Megatron-LM's ``[sum, count]`` logging pair; the training log divides the two."""
    value = torch.as_tensor(value, dtype=torch.float32, device=num_tokens.device).detach()
    return torch.stack([value * num_tokens, num_tokens.float()])


def _validate_loss(args: argparse.Namespace, loss: torch.Tensor) -> None:
    """pretrain_gpt.py's checks: NaN/Inf losses stop the run, spiky ones are reported."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    machine = get_rerun_state_machine()
    if getattr(args, "check_for_nan_in_loss_and_grad", False):
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            machine.validate_result(result=loss, rejection_func=reject,
                                    message=f"found {what} in local forward loss calculation",
                                    tolerance=0.0, fatal=True)
    if getattr(args, "check_for_spiky_loss", False):
        machine.validate_result(
            result=loss, rejection_func=functools.partial(
                machine.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR, context="loss"),
            message="Spiky loss", tolerance=0.0, fatal=False)


class LocalOptForwardStep:
    """Megatron-Core's ``forward_step_func`` for the plugin's objectives and regularizers.

    Window draws are a function of ``(iteration, global micro-batch)``, as in the plugin's
    trainer. The global micro-batch index comes from the one Megatron-Core's schedule gives the
    model (``current_microbatch``) and the data-parallel rank; the iteration is Megatron-LM's
    ``args.curr_iteration`` inside ``pretrain()``, else :attr:`iteration`, which advances each
    time micro-batch 0 comes again (set it yourself when a loop interleaves evaluation). A model
    in eval mode (Megatron's evaluation) gets the full-sequence loss, reported as
    ``valid full-sequence loss``.

    ``args=None`` reads Megatron-LM's arguments at the first call (they are parsed inside
    ``pretrain()``, after the training script creates this object).
    """

    def __init__(self, args: argparse.Namespace | None = None) -> None:
        self.args = args
        self.iteration = 0
        self._first_chunk: int | None = None
        self._objective = None
        self._full: FullSequence | None = None
        self._regularizers: list[Callable] = []

    def _setup(self) -> None:
        if self.args is None:
            self.args = megatron_args()
        parts = plugin_setup(self.args)[1]
        self._layout = parts.source.layout
        self._objective = parts.objective
        self._full = FullSequence(parts.source.layout)
        self._regularizers = list(parts.regularizers)

    def _position(self, model: GPTModel) -> tuple[int, int]:
        layers = model.decoder.layers
        micro_batch = getattr(layers[0], "current_microbatch", None) if len(layers) else None
        if micro_batch is None:
            raise RuntimeError("no current_microbatch on the model: call LocalOptForwardStep "
                               "through Megatron-Core's get_forward_backward_func() schedule")
        # Every model chunk (virtual pipeline stage) sees micro-batch 0 once per iteration,
        # the first chunk first: count iterations on that chunk.
        if self._first_chunk is None:
            self._first_chunk = id(model)
        elif micro_batch == 0 and id(model) == self._first_chunk:
            self.iteration += 1
        iteration = _training_iteration()
        return (self.iteration if iteration is None else iteration), global_micro_batch(
            micro_batch)

    def __call__(self, data_iterator: Iterator[dict] | None, model: torch.nn.Module,
                 return_schedule_plan: bool = False):
        if return_schedule_plan:
            raise UserError("the combined 1F1B schedule (--overlap-moe-expert-parallel-comm) "
                            "is not supported by the plugin's forward step")
        if self._objective is None:
            self._setup()
        inner: GPTModel = get_attr_wrapped_model(model, "decoder", return_model_obj=True)
        iteration, micro_batch = self._position(inner)
        evaluating = not inner.training
        objective = self._full if evaluating else self._objective
        if inner.pre_process or inner.post_process:
            tokens = next(data_iterator)["tokens"].to(default_device(), non_blocking=True)
        else:  # a middle stage reads no data: the plan's shape is all it needs
            received = inner.decoder.input_tensor
            tokens = torch.zeros((received.shape[1], self._layout.seq_length),
                                 dtype=torch.long, device=received.device)
        plan = objective.plan(tokens, iteration, micro_batch)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            self._check_pipelined(plan, inner)
        with final_norm_input(inner) as pre_norm:
            hidden = plan_hidden(inner, plan)
        if not inner.post_process:
            return hidden, None
        losses, hidden, pre_norm_hidden, shard, loss_shard = optimized_outputs(
            inner, plan, hidden, pre_norm["hidden"])
        loss_func = self.eval_loss_func if evaluating else self.loss_func
        return losses, functools.partial(loss_func, plan, hidden, pre_norm_hidden, shard,
                                         loss_shard, iteration)

    def _check_pipelined(self, plan: ForwardPlan, model: GPTModel) -> None:
        rows = len(plan.positions) + (0 if plan.context_ids is None else plan.context_ids.shape[1])
        if not model.config.variable_seq_lengths and rows != self.args.seq_length:
            raise RuntimeError(f"--objective {self.args.objective} sends {rows} rows between "
                               f"pipeline stages, not --seq-length {self.args.seq_length}: "
                               f"build the model with config.variable_seq_lengths = True "
                               f"(model_provider does)")

    def loss_func(self, plan: ForwardPlan, hidden: torch.Tensor, pre_norm_hidden: torch.Tensor,
                  shard: SequenceShard | None, loss_shard: SequenceShard | None,
                  iteration: int, output_tensor: torch.Tensor):
        """``(summed_loss, num_tokens, report)``: the objective's mean loss plus regularizers,
        times the token count, so Megatron's division by ``num_tokens`` (or, with
        ``--calculate-per-token-loss``, by the global token count) recovers the plugin's loss.

        Under context parallelism each rank's loss is its share of the sample's and Megatron's
        DDP averages gradients over data x context-parallel ranks: the share is scaled by the
        context-parallel size so that the shares' gradients sum (the reports are whole)."""
        out = objective_output(output_tensor, hidden, pre_norm_hidden, plan.first_frame,
                               plan.num_frames, plan.metrics, shard, loss_shard,
                               plan.window_count)
        num_tokens = torch.tensor(out.num_tokens, dtype=torch.int, device=out.loss.device)
        total, metrics = apply_regularizers(out, self._regularizers, iteration)
        if self.args is not None:
            _validate_loss(self.args, total)
        # Megatron-LM logs every reported pair; the total is its own loss, not logged twice
        report = {k: _report(v, num_tokens) for k, v in metrics.items()
                  if k.endswith("loss") and k != TOTAL_LOSS}
        shares = 1 if loss_shard is None else loss_shard.world
        return total * (out.num_tokens * shares), num_tokens, report

    def eval_loss_func(self, plan: ForwardPlan, hidden: torch.Tensor,
                       pre_norm_hidden: torch.Tensor, shard: SequenceShard | None,
                       loss_shard: SequenceShard | None, iteration: int,
                       output_tensor: torch.Tensor):
        """Evaluation: the full-sequence cross-entropy alone, in the same contract."""
        out = objective_output(output_tensor, hidden, pre_norm_hidden, plan.first_frame,
                               plan.num_frames, shard=shard, loss_shard=loss_shard)
        lm_loss = out.lm_loss()
        num_tokens = torch.tensor(out.num_tokens, dtype=torch.int, device=lm_loss.device)
        return lm_loss * num_tokens, num_tokens, {VALID_LOSS: _report(lm_loss, num_tokens)}


# -------------------------------------------------------------------------------- data


class MicroBatchStream(torch.utils.data.IterableDataset):
    """One data-parallel rank's endless micro-batches of a :class:`BatchSource`.

    It is its own iterator because Megatron-LM's ``--dataloader-type external`` calls
    ``next()`` on the dataset it is given; the stream opens (workers start) on first use.
    """

    def __init__(self, source: BatchSource, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, consumed_samples: int = 0) -> None:
        self.source, self.micro_batch_size = source, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed_samples = consumed_samples
        self._batches: Iterator[dict] | None = None

    def __iter__(self) -> MicroBatchStream:
        return self

    def __next__(self) -> dict:
        if self._batches is None:
            self._batches = self.source.batches(self.micro_batch_size, self.dp_rank,
                                                self.dp_size, self.seed, self.consumed_samples)
        return next(self._batches)


def build_datasets(args: argparse.Namespace, consumed_train_samples: int = 0,
                   consumed_valid_samples: int = 0,
                   ) -> tuple[MicroBatchStream, MicroBatchStream | None, None]:
    """Train and valid streams of ``--dataset`` for this data-parallel rank (no test split)."""
    source = video_source(args)
    rank = parallel_state.get_data_parallel_rank()
    size = parallel_state.get_data_parallel_world_size()
    train = MicroBatchStream(source.train, args.micro_batch_size, rank, size, args.seed,
                             consumed_train_samples)
    valid = None
    if source.valid is not None:
        valid = MicroBatchStream(source.valid, args.micro_batch_size, rank, size, args.seed,
                                 consumed_valid_samples)
    return train, valid, None


def train_valid_test_datasets_provider(train_val_test_num_samples: list[int],
                                       vp_stage: int | None = None):
    """Megatron-LM's dataset provider; resumes after Megatron's consumed-sample counters."""
    args = megatron_args()
    if args.dataloader_type != "external":
        raise UserError("the plugin's datasets are streams: add --dataloader-type external")
    layout = video_source(args).layout
    # Megatron-LM wants a multiple of 2 x CP under context parallelism; the plugin's plans
    # split the sample's own tokens, so the next such multiple stands for them there
    multiple = 2 * args.context_parallel_size if args.context_parallel_size > 1 else 1
    expected = -(-layout.input_length // multiple) * multiple
    if args.seq_length != expected:
        why = (", the multiple of 2 x --context-parallel-size Megatron-LM wants"
               if multiple > 1 else "")
        raise UserError(f"--seq-length {args.seq_length} does not match the dataset's samples "
                        f"({layout.input_length} input tokens): set --seq-length "
                        f"{expected}{why}")
    train, valid, test = build_datasets(args, args.consumed_train_samples,
                                        args.consumed_valid_samples)
    if valid is None and args.eval_iters:
        log.warning("dataset %s has no validation split (--valid-data-path): Megatron's "
                    "evaluation is turned off (--eval-iters 0)", args.dataset)
        args.eval_iters = 0
    return train, valid, test


# Every rank reads its own (identical across tensor-parallel ranks) stream: no broadcast.
train_valid_test_datasets_provider.is_distributed = True


# ----------------------------------------------------------------------------- pretrain


def pretrain(forward_step: LocalOptForwardStep | None = None, **kwargs: Any) -> None:
    """Megatron-LM's ``pretrain()`` with the plugin's providers, for the installed version.

    0.16/0.17 take the providers positionally and parse the flags themselves; 0.18+ take a
    config container first, built from the flags parsed with the plugin's group and without
    a model config (with one, 0.19 builds its own model and never calls ``model_provider``).
    ``kwargs`` go to Megatron-LM's ``pretrain()`` (e.g. ``store=``). On a machine without
    CUDA the platform's Megatron-LM shims are applied first. The plugin's configuration is built
    from the parsed flags before Megatron-LM starts any process group, so a bad plugin setting
    ends the run with one line naming its flag.
    """
    import megatron.core
    from megatron.training import pretrain as megatron_pretrain

    apply_megatron_lm_shims()
    print(f"localopt-plugin: Megatron-LM pretrain() of megatron-core {megatron.core.__version__}",
          flush=True)
    providers = {
        "train_valid_test_dataset_provider": train_valid_test_datasets_provider,
        "model_provider": model_provider,
        "model_type": ModelType.encoder_or_decoder,
        "forward_step_func": forward_step or LocalOptForwardStep(),
        **kwargs,
    }
    if "cfg_container" not in inspect.signature(megatron_pretrain).parameters:
        from megatron.training.arguments import parse_args

        plugin_setup(parse_args(extra_args_provider))  # bad settings stop before any group
        megatron_pretrain(extra_args_provider=extra_args_provider, **providers)
        return
    from megatron.training import argument_utils
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(extra_args_provider=extra_args_provider)
    plugin_setup(args)  # a bad window, regularizer or dataset setting stops before any group
    megatron_pretrain(argument_utils.pretrain_cfg_container_from_args(args), **providers)
