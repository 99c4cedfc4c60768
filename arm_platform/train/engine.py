"""One training epoch and one evaluation pass, plain PyTorch (no Ray).

Reference: MAE / ARM `engine_pretrain.py` and `engine_finetune.py`: per-iteration lr, `accum_iter` gradient
accumulation, `math.isfinite` loss guard, clip after unscale, EMA update after every optimizer step, top-1/top-5.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from arm_platform.train.schedule import Schedule, apply_lr
from arm_platform.train.tasks import FinetuneTask, PretrainTask, unwrap

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA only (CPU always runs fp32)."""
    enabled = device.type == "cuda" and precision == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def train_one_epoch(
    task: PretrainTask | FinetuneTask,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    *,
    start_step: int,
    max_steps: int,
    accum_iter: int = 1,
    clip_grad: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
    ema: nn.Module | None = None,
    precision: str = "bf16",
    world_size: int = 1,
    on_step: StepCallback | None = None,
) -> dict[str, float]:
    """Run up to `max_steps` optimizer steps (each `accum_iter` micro-batches) over `batches`.

    Args:
        batches: dicts with "image" (B, C, H, W) and "label" (B,) already on the model's device.
        start_step: global optimizer step before this epoch (drives the lr schedule).
        on_step: called as on_step(step, {"loss", "lr", "img_per_s"}) after each optimizer step.

    Returns:
        {"loss": mean loss, "steps": optimizer steps taken, "img_per_s": global images per second}.
    """
    model = task.model
    model.train()
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    step, micro, window_loss, loss_sum, images = start_step, 0, 0.0, 0.0, 0
    t_epoch = t_step = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for batch in batches:
        if step - start_step >= max_steps:
            break
        if micro == 0:
            lr = schedule.lr_at(step)
            apply_lr(optimizer, lr)
        device = batch["image"].device
        last_micro = micro == accum_iter - 1
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, precision):
                loss = task.forward(batch)["loss"]
            value = loss.item()
            if not math.isfinite(value):
                raise RuntimeError(f"loss is {value} at step {step}, stopping training")
            scaler.scale(loss / accum_iter).backward()
        window_loss += value / accum_iter
        images += batch["image"].shape[0] * world_size
        micro += 1
        if not last_micro:
            continue
        _optimizer_step(model, optimizer, scaler, clip_grad)
        step, micro = step + 1, 0
        if ema is not None:
            ema.update(unwrap(model), step=step)
        now = time.perf_counter()
        step_imgs = batch["image"].shape[0] * accum_iter * world_size
        metrics = {"loss": window_loss, "lr": lr, "img_per_s": step_imgs / max(now - t_step, 1e-9)}
        loss_sum, window_loss, t_step = loss_sum + window_loss, 0.0, now
        if on_step is not None:
            on_step(step, metrics)
    steps = step - start_step
    elapsed = max(time.perf_counter() - t_epoch, 1e-9)
    return {"loss": loss_sum / max(steps, 1), "steps": steps, "img_per_s": images / elapsed}


def _optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip_grad: float | None
) -> None:
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(
    models: Mapping[str, nn.Module],
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    precision: str = "bf16",
    distributed: bool = False,
) -> dict[str, dict[str, float]]:
    """{name: top-1 / top-5 accuracy (percent), mean cross-entropy, count} of each model on the same labelled batches.

    One pass over the data serves all models (e.g. the model and its EMA: the val set is decoded once). With
    `distributed`, counts are summed over all ranks (each rank saw a disjoint shard: official --dist_eval).
    """
    names = list(models)
    for model in models.values():
        model.eval()
    device = next(models[names[0]].parameters()).device
    totals = torch.zeros(len(names), 4, dtype=torch.float64, device=device)  # correct1, correct5, count, loss_sum
    for batch in batches:
        for i, name in enumerate(names):
            with autocast(device, precision):
                logits = models[name](batch["image"])
            totals[i] += _batch_totals(logits.float(), batch["label"])
    if distributed and _is_distributed():
        dist.all_reduce(totals)
    return {name: _accuracy(row) for name, row in zip(names, totals.tolist(), strict=True)}


def score_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 / top-5 (percent, top-5 capped at the class count), mean cross-entropy and count of (N, C) logits."""
    return _accuracy(_batch_totals(logits.float(), labels.long()).tolist())


def _batch_totals(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(4,) float64: top-1 hits, top-5 hits, count and summed cross-entropy of (B, classes) logits."""
    topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = topk.eq(labels[:, None])
    loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
    count = torch.tensor(labels.numel(), device=logits.device)
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), count, loss]).double()


def _accuracy(totals: list[float]) -> dict[str, float]:
    correct1, correct5, count, loss_sum = totals
    n = max(count, 1.0)
    return {"acc1": 100 * correct1 / n, "acc5": 100 * correct5 / n, "loss": loss_sum / n, "count": int(count)}


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def sum_over_workers(value: float, device: torch.device) -> float:
    """`value` summed over all workers of the process group (itself when not distributed); a collective call."""
    if not _is_distributed():
        return float(value)
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item()
