"""Optimizer and LR schedule for ``deepspeed.initialize``: Megatron's grouping and schedule.

What DeepSpeed gets depends on the JSON (:mod:`.deepspeed_config`): the flags' AdamW (torch's
fused one on a GPU), DeepSpeed's CPU Adam under ZeRO-Offload or ``--cpu-optimizer``, or nothing
when the JSON has an ``optimizer`` section (DeepSpeed builds it from ``param_groups``);
Megatron-Core's own ``OptimizerParamScheduler`` unless the JSON has a ``scheduler`` section.
"""

from __future__ import annotations

import torch

from localopt_plugin.errors import UserError
from localopt_plugin.platform import cuda_available
from localopt_plugin.training.config import TrainConfig


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Megatron's grouping: no weight decay on biases and norm weights (wd_mult 0)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "wd_mult": 1.0},
            {"params": no_decay, "wd_mult": 0.0, "weight_decay": 0.0}]


def build_optimizer(groups: list[dict], config: TrainConfig):
    """The flags' optimizer for DeepSpeed (``--optimizer adam``: AdamW, as Megatron's adam;
    ``sgd``: SGD with momentum), or None when the JSON's optimizer section rules."""
    ds, opt = config.deepspeed, config.optimizer
    if ds.json_optimizer:
        return None
    if opt.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.sgd_momentum,
                               weight_decay=opt.weight_decay)
    kwargs = dict(lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps,
                  weight_decay=opt.weight_decay)
    if ds.offload_optimizer or opt.cpu_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=cuda_available(), **kwargs)


class MegatronLRScheduler:
    """Megatron-Core's OptimizerParamScheduler with the ``step()`` DeepSpeed calls."""

    def __init__(self, optimizer, config: TrainConfig) -> None:
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        opt, ds = config.optimizer, config.deepspeed
        weight_decay = (ds.schedule_weight_decay if ds.schedule_weight_decay is not None
                        else opt.weight_decay)
        # in iterations; a sample-based schedule divided by the global batch gives, at every
        # iteration, the LR Megatron-LM's counting in samples gives
        lr, warmup, decay, wsd_decay = config.lr_schedule()
        wsd = opt.lr_decay_style == "WSD"
        self.inner = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0 if warmup else lr,
            max_lr=lr,
            min_lr=opt.min_lr,
            lr_warmup_steps=warmup,
            lr_decay_steps=max(decay, warmup + 1),
            lr_decay_style=opt.lr_decay_style,
            start_wd=weight_decay,
            end_wd=weight_decay,
            wd_incr_steps=max(decay, 1),
            wd_incr_style="constant",
            wsd_decay_steps=wsd_decay if wsd else None,
            lr_wsd_decay_style=opt.lr_wsd_decay_style if wsd else None,
            use_checkpoint_opt_param_scheduler=opt.use_checkpoint_opt_param_scheduler,
            override_opt_param_scheduler=opt.override_opt_param_scheduler,
        )

    def step(self, increment: int = 1) -> None:
        self.inner.step(increment)

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.inner.optimizer.param_groups]

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        try:
            self.inner.load_state_dict(state)
        except AssertionError as err:  # Megatron-LM's rule: the flags' schedule must match
            raise UserError(f"the LR schedule of the flags differs from the checkpoint's "
                            f"({err}): pass --override-opt_param-scheduler to use the flags', "
                            f"or --use-checkpoint-opt_param-scheduler to keep the "
                            f"checkpoint's") from None


def build_scheduler(config: TrainConfig):
    """The ``lr_scheduler`` argument of ``deepspeed.initialize`` (None: the JSON's)."""
    if config.deepspeed.json_scheduler:
        return None
    return lambda optimizer: MegatronLRScheduler(optimizer, config)
