"""Checkpoint conversion: DeepSpeed (zero_to_fp32 output or module states) -> plain GPTModel.

The trainer's DeepSpeed module is ``TrainingStep`` whose GPT lives under ``model.``; a plain
Megatron-Core ``GPTModel`` (for generation, evaluation, or Megatron-LM) takes the same keys
without that prefix.
"""

from __future__ import annotations

import os

import torch

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
    """Load a converted state dict; every GPTModel parameter must be present."""
    converted = gptmodel_state_dict(state)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"checkpoint does not fit the model: missing {missing}, "
                       f"unexpected {unexpected}")


def load_trained_model(checkpoint_dir: str, tag: str | None = None):
    """A plain GPTModel (eval mode) rebuilt from a trainer checkpoint, and the checkpoint's
    saved metadata (``args``, ``vocabulary``, ``layout``, ``data_info``, ``iteration``).

    Needs the process groups of a world of one (``init_distributed()``). Data-parallel and
    ZeRO-1/2 checkpoints hold the full weights in their module states; ZeRO-3 ones are gathered
    with DeepSpeed's own zero_to_fp32. Pipeline-parallel checkpoints are not supported yet.
    """
    import argparse

    from localopt_plugin.data.layout import Vocabulary
    from localopt_plugin.model import build_gpt_model

    if tag is None:
        with open(os.path.join(checkpoint_dir, "latest")) as f:
            tag = f.read().strip()
    states_file = os.path.join(checkpoint_dir, tag, "mp_rank_00_model_states.pt")
    if not os.path.exists(states_file):
        raise FileNotFoundError(f"{states_file} not found: not a data-parallel plugin checkpoint "
                                "(pipeline-parallel checkpoints are not supported here yet)")
    states = torch.load(states_file, map_location="cpu", weights_only=False)
    meta = {k: states[k] for k in ("args", "vocabulary", "layout", "data_info", "iteration")
            if k in states}
    if "args" not in meta:
        raise KeyError(f"{states_file} has no saved flags; was it written by localopt-train?")
    args = argparse.Namespace(**meta["args"])
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
    args.sequence_parallel = args.bf16 = args.fp16 = False  # an fp32 model for generation
    model = build_gpt_model(args, vocab_size=Vocabulary(**meta["vocabulary"]).size)
    if states["ds_config"]["zero_optimization"]["stage"] == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    else:
        weights = states["module"]
    load_into_gptmodel(model, {k: v.float() if v.is_floating_point() else v
                               for k, v in weights.items() if isinstance(v, torch.Tensor)})
    return model.eval(), meta
