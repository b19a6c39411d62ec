"""Checkpoint conversion: any checkpoint ``localopt-train`` wrote -> one plain GPTModel.

Data-parallel (ZeRO 0-3), tensor-parallel and pipeline-parallel checkpoints all become the
single-process Megatron-Core ``GPTModel`` they are a split of, for generation, evaluation or
Megatron-LM:

* data parallel / ZeRO-1/2: the module states (``mp_rank_XX_model_states.pt``) hold the full
  weights under the trainer's ``TrainingStep`` names (``model.<GPTModel name>``); ZeRO-3's
  are gathered with DeepSpeed's own zero_to_fp32;
* tensor parallel: one module-state file per TP rank; each partitioned parameter is merged
  along its partition dimension as Megatron split it (a gated MLP's ``[gate; up]`` stride
  included), replicated ones are taken from rank 0;
* pipeline parallel: DeepSpeed writes one file per pipeline layer and TP rank
  (``layer_XX-model_YY-model_states.pt``): one GPTModel per stage, its layers renumbered after
  the previous stages'; checkpoints written before (the embedding, each transformer layer, the
  final norm and the output layer, one file each) are read too.

The merged model pads its vocabulary as the trained one did (``divisible_by x TP``), so it
computes exactly the trained function.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

import torch

from localopt_plugin.errors import UserError
from localopt_plugin.model.init import tensor_parallel_merge

TRAINING_STEP_PREFIX = "model."


def gptmodel_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of the trainer's module mapped to GPTModel keys (non-model entries dropped)."""
    return {k[len(TRAINING_STEP_PREFIX):]: v for k, v in state.items()
            if k.startswith(TRAINING_STEP_PREFIX)}


def load_fp32_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read zero_to_fp32's output: a directory (pytorch_model.bin or safetensors) or a file."""
    if os.path.isdir(path):
        for name in ("pytorch_model.bin", "model.safetensors"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"no pytorch_model.bin or model.safetensors in {path} "
                                    "(sharded zero_to_fp32 output: pass --max_shard_size large)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_into_gptmodel(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a converted state dict (trainer names); every GPTModel parameter must be present."""
    load_gptmodel_weights(model, gptmodel_state_dict(state))


def load_gptmodel_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load weights under GPTModel's own names; every parameter must be present."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"checkpoint does not fit the model: missing {missing}, "
                       f"unexpected {unexpected}")


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _data_parallel_weights(directory: str, tag: str, states: list[dict],
                           zero_stage: int) -> list[dict[str, torch.Tensor]]:
    """GPTModel weights of each TP rank of a non-pipelined checkpoint."""
    if zero_stage == 3:
        if len(states) > 1:
            raise UserError("converting ZeRO-3 checkpoints with tensor parallelism is not "
                            "supported; train with --zero-stage 1 or 2 under TP")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return [gptmodel_state_dict(get_fp32_state_dict_from_zero_checkpoint(directory,
                                                                              tag=tag))]
    return [gptmodel_state_dict(_tensors(s["module"])) for s in states]


def _pipeline_files(path: str) -> list[tuple[int, int, dict[str, torch.Tensor]]]:
    """DeepSpeed's per-layer pipeline files: (layer, TP rank, tensors), in layer order."""
    files = []
    for file in glob.glob(os.path.join(path, "layer_*-model_*-model_states.pt")):
        index, rank = (int(x) for x in re.search(r"layer_(\d+)-model_(\d+)-",
                                                  os.path.basename(file)).groups())
        files.append((index, rank, _tensors(torch.load(file, map_location="cpu",
                                                       weights_only=False))))
    return sorted(files, key=lambda f: f[:2])


def pipeline_weights(path: str, num_layers: int, tp: int,
                     tied: bool) -> list[dict[str, torch.Tensor]]:
    """GPTModel weights of each TP rank from DeepSpeed's per-layer pipeline files: one
    GPTModel per stage (``gpt.``-prefixed, layers numbered per stage), or the layout written
    before it (embedding, each layer, final norm, output: one file each)."""
    files = _pipeline_files(path)
    if files and all(name.startswith("gpt.") for name in files[0][2]):
        return _stage_weights(files, tp, tied)
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for index, rank, tensors in files:
        file = f"{path}: layer {index}, TP rank {rank}"
        for name, value in tensors.items():
            if index == 0 or name.startswith("output_layer."):
                whole = name  # the embedding stage, the untied output layer
            elif 1 <= index <= num_layers:
                whole = f"decoder.layers.{index - 1}." + name.removeprefix("layer.")
            elif index == num_layers + 1:
                whole = "decoder.final_layernorm." + name.removeprefix("norm.")
            else:
                raise UserError(f"{file}: unexpected pipeline layer {index}")
            if not whole.endswith("inv_freq"):  # the rotary table is rebuilt, not loaded
                ranks[rank][whole] = value
    return ranks


def _stage_weights(files: list[tuple[int, int, dict[str, torch.Tensor]]], tp: int,
                   tied: bool) -> list[dict[str, torch.Tensor]]:
    """Whole-model weights from one GPTModel per stage: each stage's layers follow the
    previous stages' (counted from the files), a tied output weight is the embedding's."""
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    offsets: dict[int, int] = {}
    for stage in sorted({index for index, _, _ in files}):
        offsets[stage] = offsets.get(stage - 1, 0) + _stage_layers(files, stage - 1)
    for stage, rank, tensors in files:
        for name, value in tensors.items():
            name = name.removeprefix("gpt.")
            layer = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
            if layer:
                name = f"decoder.layers.{int(layer[1]) + offsets[stage]}.{layer[2]}"
            if tied and name == "output_layer.weight":
                continue  # the word embedding, kept on the first stage
            if not name.endswith("inv_freq") and not name.endswith("_extra_state"):
                ranks[rank][name] = value
    return ranks


def _stage_layers(files, stage: int) -> int:
    """Transformer layers in a stage's GPTModel (0 before the first)."""
    numbers = {int(m[1]) for index, rank, tensors in files if index == stage and rank == 0
               for name in tensors if (m := re.match(r"gpt\.decoder\.layers\.(\d+)\.", name))}
    return max(numbers, default=-1) + 1


def _merge_tensor_parallel(model: torch.nn.Module,
                           ranks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One state dict from each TP rank's, split as the model's parameters are."""
    if len(ranks) == 1:
        return ranks[0]
    params = dict(model.named_parameters())
    merged = {}
    for name, value in ranks[0].items():
        param = params.get(name)
        if param is not None and getattr(param, "tensor_model_parallel", False):
            merged[name] = tensor_parallel_merge([r[name] for r in ranks], param.partition_dim,
                                                 getattr(param, "partition_stride", 1))
        else:
            merged[name] = value
    return merged


def load_trained_model(checkpoint_dir: str, tag: str | None = None):
    """A plain GPTModel (fp32, eval mode) rebuilt from any trainer checkpoint, and the
    checkpoint's saved metadata (``config``, ``vocabulary``, ``layout``, ``data_info``,
    ``iteration``).

    Needs the process groups of a world of one (``init_distributed()``). Checkpoints of any
    config version and any TP/PP/ZeRO layout load (fields added since take their defaults).
    """
    from localopt_plugin.data.layout import Vocabulary
    from localopt_plugin.model import build_gpt_model
    from localopt_plugin.training.config import (
        model_config_from_saved,
        parallel_config_from_saved,
    )

    if tag is None:
        latest = os.path.join(checkpoint_dir, "latest")
        if not os.path.exists(latest):
            raise UserError(f"{checkpoint_dir} is not a localopt-train checkpoint directory "
                            f"(no 'latest' file)")
        with open(latest) as f:
            tag = f.read().strip()
    path = os.path.join(checkpoint_dir, tag)
    files = sorted(glob.glob(os.path.join(path, "mp_rank_*_model_states.pt")))
    if not files:
        raise UserError(f"no mp_rank_*_model_states.pt in {path}: not a checkpoint written by "
                        f"localopt-train")
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    first = states[0]
    meta = {k: first[k] for k in ("config", "vocabulary", "layout", "data_info", "iteration")
            if k in first}
    if "config" not in meta and "args" in first:  # config version 1: the flat flags
        meta["config"] = first["args"]
    if "config" not in meta:
        raise UserError(f"{files[0]} has no saved config; was it written by localopt-train?")
    trained = model_config_from_saved(meta["config"])
    layout = parallel_config_from_saved(meta["config"])
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    # DeepSpeed numbers its module-state files by model-parallel rank: TP x PP of them
    if len(files) != tp * pp:
        raise UserError(f"{path} holds {len(files)} model-parallel ranks but the saved config "
                        f"says TP {tp} x PP {pp}")
    # an fp32 model on one process, with the trained vocabulary padding
    config = dataclasses.replace(
        trained, bf16=False, fp16=False, recompute_granularity=None, recompute_method=None,
        recompute_num_layers=None,
        make_vocab_size_divisible_by=trained.make_vocab_size_divisible_by * tp)
    model = build_gpt_model(config, vocab_size=Vocabulary(**meta["vocabulary"]).size)
    if pp > 1:
        ranks = pipeline_weights(path, trained.num_layers, tp,
                                 not trained.untie_embeddings_and_output_weights)
    else:
        ranks = _data_parallel_weights(checkpoint_dir, tag, states,
                                       first["ds_config"]["zero_optimization"]["stage"])
    weights = _merge_tensor_parallel(model, ranks)
    load_gptmodel_weights(model, {k: v.float() if v.is_floating_point() else v
                                  for k, v in weights.items()})
    return model.eval(), meta
