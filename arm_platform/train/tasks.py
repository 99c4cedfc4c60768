"""Training tasks: each turns a batch into {"loss": scalar, ...}; the engine never knows the objective.

Reference: timm `timm/task/classification.py` (task object returning a dict), DeiT / ARM `main_finetune.py`
(Mixup/CutMix with label smoothing -> SoftTargetCrossEntropy, else LabelSmoothingCrossEntropy).
"""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from arm_platform.config import DataConfig, TrainConfig


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") else model


class PretrainTask:
    """ARM next-cluster regression; the model computes its own (norm-pix) loss."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch["image"]: (B, C, H, W) normalised -> {"loss": scalar}."""
        out = self.model(batch["image"])
        return {"loss": out["loss"]}

    __call__ = forward


class FinetuneTask:
    """Classification with optional Mixup/CutMix (soft targets) or label smoothing."""

    def __init__(self, model: nn.Module, mixup_fn: Mixup | None, criterion: nn.Module) -> None:
        self.model = model
        self.mixup_fn = mixup_fn
        self.criterion = criterion

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch["image"]: (B, C, H, W), batch["label"]: (B,) -> {"loss": scalar, "logits": (B, num_classes)}."""
        images, target = batch["image"], batch["label"]
        if self.mixup_fn is not None:
            images, target = self.mixup_fn(images, target)
        logits = self.model(images)
        return {"loss": self.criterion(logits, target), "logits": logits}

    __call__ = forward


def build_mixup(data_cfg: DataConfig, num_classes: int) -> Mixup | None:
    """timm Mixup/CutMix with label smoothing inside (official finetune), or None when both alphas are 0."""
    if not data_cfg.uses_mixup:
        return None
    return Mixup(
        mixup_alpha=data_cfg.mixup,
        cutmix_alpha=data_cfg.cutmix,
        prob=data_cfg.mixup_prob,
        switch_prob=data_cfg.mixup_switch_prob,
        mode=data_cfg.mixup_mode,
        label_smoothing=data_cfg.smoothing,
        num_classes=num_classes,
    )


def build_criterion(data_cfg: DataConfig) -> nn.Module:
    if data_cfg.uses_mixup:
        return SoftTargetCrossEntropy()
    if data_cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=data_cfg.smoothing)
    return nn.CrossEntropyLoss()


def build_task(cfg: TrainConfig, model: nn.Module) -> PretrainTask | FinetuneTask:
    if cfg.task == "pretrain":
        return PretrainTask(model)
    return FinetuneTask(model, build_mixup(cfg.data, cfg.model.num_classes), build_criterion(cfg.data))
