"""`build_model(model_cfg, task)` and the timm registry entries.

Each size of `recipes.ARM_SIZES` registers `<name>` (finetune classifier) and `<name>_pretrain` (pretraining model);
`import arm_platform` registers them all, and `timm.list_models("arm_*")` lists them. A name's defaults are the
geometry of that size's recipe for the task (`recipes.get("finetune_<size>")` / `"pretrain_<size>"`):

- classifiers: 224 px, 1000 classes (the paper's / official finetune models; ARM-B 85,031,656 params);
- pretraining models: 192 px (the official pretraining geometry);
- `arm_tiny_pz4[_pretrain]` is ours, the CPU demo model: 32 px and 10 classes (Fashion-MNIST) for both names; at
  224 px its patch 4 would make 3,136 tokens, which no recipe uses.

Keyword arguments are ModelConfig field names and override those defaults, e.g.
`timm.create_model("arm_base_pz16", num_classes=10, img_size=384, drop_path_rate=0.1)`; timm's `global_pool`
strings ("avg" / "token") are accepted too. `model.pretrained_cfg` describes the built model (input size,
num_classes, mean/std, `crop_pct` = img / recipes.eval_resize_for(img) with `crop_mode` "squash": the official eval
Resize((r, r)) + CenterCrop(img), so timm's `resolve_data_config` + `create_transform` rebuild our eval transform).
There are no hub weights: load checkpoints with `arm_platform.models.convert.load_pretrained`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from torch import nn

from arm_platform import recipes
from arm_platform.config import TASKS, ModelConfig
from arm_platform.models.arm import ARMPretrain
from arm_platform.models.classifier import ARMClassifier, _pool_flag
from arm_platform.recipes import ARM_SIZES

PRETRAIN_SUFFIX = "_pretrain"

_TIMM_ONLY_KWARGS = ("pretrained_cfg", "cache_dir")

default_cfgs: dict[str, dict[str, Any]] = {}
"""timm reads `<module>.default_cfgs[name]` at registration (filled below, before `register_model`)."""


def build_model(model_cfg: ModelConfig, task: str) -> nn.Module:
    """ARMPretrain for task "pretrain", ARMClassifier for "finetune"."""
    if task == "pretrain":
        return ARMPretrain(model_cfg)
    if task == "finetune":
        return ARMClassifier(model_cfg)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def eval_crop_pct(img_size: int) -> float:
    """timm crop_pct whose `floor(img / crop_pct)` is `recipes.eval_resize_for(img)`: the official 0.875 where that
    rounds the same way (224 -> 256, 192 -> 219), else img / resize (32 -> 32/37 for 37 px; 384 -> 1.0)."""
    resize = recipes.eval_resize_for(img_size)
    return recipes.EVAL_CROP_PCT if math.floor(img_size / recipes.EVAL_CROP_PCT) == resize else img_size / resize


def pretrained_cfg_for(model_cfg: ModelConfig, task: str) -> dict[str, Any]:
    """timm-style pretrained_cfg of a built model (input size, eval crop, normalisation, head name); no weights url.

    Pretraining models have no classifier (`ar_pred` predicts pixels), hence num_classes 0 and classifier None.
    """
    finetune = task == "finetune"
    return dict(
        url="",
        num_classes=model_cfg.num_classes if finetune else 0,
        input_size=(model_cfg.in_chans, model_cfg.img_size, model_cfg.img_size),
        fixed_input_size=True,
        pool_size=None,
        crop_pct=eval_crop_pct(model_cfg.img_size),
        crop_mode="squash",
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.proj",
        classifier="head" if finetune else None,
        license="apache-2.0",
        paper_ids="arXiv:2406.07537",
        origin_url="https://github.com/OliverRensu/ARM",
    )


def default_model_config(size: str, task: str) -> ModelConfig:
    """A timm name's defaults: `ARM_SIZES[size]` with img_size / num_classes of the size's `task` recipe."""
    recipe_model = recipes.get(f"{task}_{size}").model
    return dataclasses.replace(ARM_SIZES[size], img_size=recipe_model.img_size, num_classes=recipe_model.num_classes)


def model_config(size: str, task: str = "finetune", **overrides: Any) -> ModelConfig:
    """`default_model_config(size, task)` with ModelConfig field overrides; ValueError naming unknown fields."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid: {sorted(fields)}")
    if isinstance(overrides.get("global_pool"), str):
        overrides["global_pool"] = _pool_flag(overrides["global_pool"])
    return dataclasses.replace(default_model_config(size, task), **overrides)


def _create(size: str, task: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    if pretrained:
        raise ValueError(
            "ARM models have no hub weights; build with pretrained=False and use "
            "arm_platform.models.convert.load_pretrained(model, checkpoint)"
        )
    for key in _TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    cfg = model_config(size, task, **kwargs)
    if device is not None:
        with torch.device(device):
            model = build_model(cfg, task)
    else:
        model = build_model(cfg, task)
    if dtype is not None:
        model = model.to(dtype=dtype)
    model.pretrained_cfg = model.default_cfg = pretrained_cfg_for(cfg, task) | dict(overlay)
    return model


def _entrypoint(size: str, task: str) -> Callable[..., nn.Module]:
    name = ARM_SIZES[size].name + (PRETRAIN_SUFFIX if task == "pretrain" else "")

    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create(size, task, pretrained, **kwargs)

    cfg = default_model_config(size, task)
    kind = "pretraining model" if task == "pretrain" else f"classifier, {cfg.num_classes} classes"
    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"ARM {size} {kind}, {cfg.img_size} px by default (recipes.ARM_SIZES, recipe {task}_{size})."
    return entry


def _register_all() -> list[str]:
    names = []
    for size in ARM_SIZES:
        for task in TASKS:
            fn = _entrypoint(size, task)
            default_cfgs[fn.__name__] = pretrained_cfg_for(default_model_config(size, task), task)
            setattr(sys.modules[__name__], fn.__name__, register_model(fn))
            names.append(fn.__name__)
    return names


REGISTERED_MODELS: list[str] = _register_all()
"""timm names registered on import: arm_{tiny_pz4,small_pz16,base_pz16,large_pz16,huge_pz16}[_pretrain]."""
