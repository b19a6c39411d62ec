"""Pretrain a video-token GPT with Megatron-LM's ``pretrain()`` and the localopt-plugin.

A pretrain_gpt.py-style script: Megatron-LM runs the loop (optimizer, checkpoints, logging);
the plugin supplies the flags, the model, the loss (Local Opt. + ReCo) and the data.
``localopt_plugin.megatron_lm.pretrain`` calls the installed Megatron-LM's ``pretrain()`` with
the signature it has (0.16/0.17 or 0.18+). See docs/megatron-lm.md for the launch flags.
"""

from localopt_plugin.megatron_lm import LocalOptForwardStep, pretrain
from localopt_plugin.platform import apply_cpu_shims

if __name__ == "__main__":
    apply_cpu_shims()  # no-op with CUDA
    pretrain(forward_step=LocalOptForwardStep())
