"""`build_model(model_cfg, task)` and the timm registry entries.

Each size of `recipes.ARM_SIZES` registers `<name>` (finetune classifier) and `<name>_pretrain` (pretraining model),
e.g. `timm.create_model("arm_base_pz16", num_classes=10, img_size=224, drop_path_rate=0.1)`. Keyword arguments are
ModelConfig field names and override the size's values. There are no hub weights: load checkpoints with
`arm_platform.models.convert.load_pretrained`.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from torch import nn

from arm_platform.config import TASKS, ModelConfig
from arm_platform.models.arm import ARMPretrain
from arm_platform.models.classifier import ARMClassifier
from arm_platform.recipes import ARM_SIZES, EVAL_CROP_PCT

PRETRAIN_SUFFIX = "_pretrain"

_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")

default_cfgs: dict[str, dict[str, Any]] = {}
"""timm reads `<module>.default_cfgs[name]` at registration (filled below, before `register_model`)."""


def build_model(model_cfg: ModelConfig, task: str) -> nn.Module:
    """ARMPretrain for task "pretrain", ARMClassifier for "finetune"."""
    if task == "pretrain":
        return ARMPretrain(model_cfg)
    if task == "finetune":
        return ARMClassifier(model_cfg)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def pretrained_cfg_for(model_cfg: ModelConfig, task: str) -> dict[str, Any]:
    """timm-style pretrained_cfg (input size, normalisation, classifier name); no weights url."""
    return dict(
        url="",
        num_classes=model_cfg.num_classes if task == "finetune" else 0,
        input_size=(model_cfg.in_chans, model_cfg.img_size, model_cfg.img_size),
        pool_size=None,
        crop_pct=EVAL_CROP_PCT,
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.proj",
        classifier="head" if task == "finetune" else "ar_pred",
        license="apache-2.0",
    )


def model_config(size: str, **overrides: Any) -> ModelConfig:
    """`ARM_SIZES[size]` with ModelConfig field overrides; ValueError naming unknown fields."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid: {sorted(fields)}")
    return dataclasses.replace(ARM_SIZES[size], **overrides)


def _create(size: str, task: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    if pretrained:
        raise ValueError(
            "ARM models have no hub weights; build with pretrained=False and use "
            "arm_platform.models.convert.load_pretrained(model, checkpoint)"
        )
    for key in _TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    cfg = model_config(size, **kwargs)
    if device is not None:
        with torch.device(device):
            model = build_model(cfg, task)
    else:
        model = build_model(cfg, task)
    if dtype is not None:
        model = model.to(dtype=dtype)
    model.pretrained_cfg = model.default_cfg = pretrained_cfg_for(cfg, task)
    return model


def _entrypoint(size: str, task: str) -> Callable[..., nn.Module]:
    name = ARM_SIZES[size].name + (PRETRAIN_SUFFIX if task == "pretrain" else "")

    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create(size, task, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"ARM {size} {'pretraining model' if task == 'pretrain' else 'classifier'} (recipes.ARM_SIZES)."
    return entry


def _register_all() -> list[str]:
    names = []
    for size in ARM_SIZES:
        for task in TASKS:
            fn = _entrypoint(size, task)
            default_cfgs[fn.__name__] = pretrained_cfg_for(ARM_SIZES[size], task)
            setattr(sys.modules[__name__], fn.__name__, register_model(fn))
            names.append(fn.__name__)
    return names


REGISTERED_MODELS: list[str] = _register_all()
"""timm names registered on import: arm_{tiny_pz4,small_pz16,base_pz16,large_pz16,huge_pz16}[_pretrain]."""
