"""Per-iteration learning-rate schedule: linear warmup then half-cycle cosine to `min_lr`.

Reference: MAE / ARM `util/lr_sched.py` (`adjust_learning_rate`), expressed in optimizer steps instead of fractional
epochs (identical, because the official fractional epoch is `data_iter_step / len(loader) + epoch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Schedule:
    """Peak lr, floor and lengths (in optimizer steps) of one run."""

    peak_lr: float
    min_lr: float
    warmup_steps: float
    total_steps: int

    def lr_at(self, step: float) -> float:
        return lr_at(
            step, peak_lr=self.peak_lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps, total_steps=self.total_steps
        )


def lr_at(step: float, *, peak_lr: float, min_lr: float, warmup_steps: float, total_steps: int) -> float:
    """Learning rate at optimizer step `step` (0-indexed, may be fractional).

    Warmup: peak_lr * step / warmup_steps; then min_lr + (peak_lr - min_lr) * (1 + cos(pi * progress)) / 2 with
    progress = (step - warmup_steps) / (total_steps - warmup_steps).
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1e-12)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_schedule(optim_cfg, *, num_workers: int, steps_per_epoch: int) -> Schedule:
    """Schedule of a run from its OptimConfig: peak lr from the MAE rule, lengths from epochs x steps_per_epoch."""
    return Schedule(
        peak_lr=optim_cfg.effective_lr(num_workers),
        min_lr=optim_cfg.min_lr,
        warmup_steps=optim_cfg.warmup_epochs * steps_per_epoch,
        total_steps=optim_cfg.epochs * steps_per_epoch,
    )


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's lr to `lr * group["lr_scale"]` (layer-wise decay; scale 1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
