"""AdamW parameter groups and optimizer construction.

Pretraining follows the official `timm.optim.add_weight_decay(model, wd)` with an empty skip list: no decay for 1-D
parameters or names ending in ".bias"; decay on everything else (including the 2-D `A_log`, conv1d weights and
`ar_token`); frozen parameters (fixed sin-cos tables) are excluded. Finetuning uses timm's layer-wise lr decay groups
(`param_groups_layer_decay`, BEiT / MAE `util/lr_decay.py`) driven by the model's `group_matcher` / `no_weight_decay`.
"""

from __future__ import annotations

import logging

import torch
from timm.optim import param_groups_layer_decay
from torch import nn

from arm_platform.config import OptimConfig

log = logging.getLogger(__name__)


def pretrain_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups (no_decay, decay) with official `add_weight_decay` semantics."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
    ]


def finetune_param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """Layer-decay groups: scale = layer_decay ** (depth + 1 - layer_id), layer 0 = patch/pos/cls, last = head/norm.

    Without layer decay, the same no-decay rules apply with every scale 1.
    """
    no_decay = list(getattr(model, "no_weight_decay", lambda: set())())
    if layer_decay is None:
        layer_decay = 1.0
    return param_groups_layer_decay(
        model, weight_decay=weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay
    )


def param_groups(model: nn.Module, optim_cfg: OptimConfig, task: str) -> list[dict]:
    if task == "pretrain":
        return pretrain_param_groups(model, optim_cfg.weight_decay)
    return finetune_param_groups(model, optim_cfg.weight_decay, optim_cfg.layer_decay)


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig, task: str) -> torch.optim.AdamW:
    """AdamW over the task's param groups (lr is set per step by the schedule; betas/eps from the config)."""
    groups = [g for g in param_groups(model, optim_cfg, task) if g["params"]]
    log.info("optimizer: %d param groups, %d tensors", len(groups), sum(len(g["params"]) for g in groups))
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
