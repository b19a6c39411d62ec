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
