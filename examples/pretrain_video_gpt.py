"""Pretrain a video-token GPT with Megatron-LM's ``pretrain()`` and the localopt-plugin.

A pretrain_gpt.py-style script: Megatron-LM runs the loop (optimizer, DDP, checkpoints,
logging); the plugin supplies the flags, the model, the loss (Local Opt. + ReCo) and the data.
``localopt_plugin.megatron_lm.pretrain`` calls the installed Megatron-LM's ``pretrain()`` with
the signature it has (0.16/0.17 or 0.18+). Launch flags: docs/megatron-lm.md and
megatron_configs/pretrain_video_gpt.sh.
"""

import sys

from localopt_plugin.commands import exit_on_user_error
from localopt_plugin.megatron_lm import LocalOptForwardStep, pretrain

if __name__ == "__main__":
    # a bad plugin setting ends the run with one "error: ..." line naming the flag
    sys.exit(exit_on_user_error(lambda: pretrain(forward_step=LocalOptForwardStep())))
