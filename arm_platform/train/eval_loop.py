"""Ray Train entry of the official `--eval`: top-1 / top-5 of checkpoints on the val split, no training."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from arm_platform.config import TrainConfig
from arm_platform.data.datasets import iter_batches
from arm_platform.models import build_model
from arm_platform.models.convert import load_checkpoint_state
from arm_platform.train.checkpoint import read_raw_weights, read_weights
from arm_platform.train.engine import evaluate


def load_eval_weights(model: torch.nn.Module, source: str, weights: str = "model") -> None:
    """A run checkpoint folder's model.pt (verified against its manifest; the EMA copy when EMA was on) or an
    official finetuned checkpoint-N.pth; weights="raw": the folder's raw model from state.pt instead."""
    if weights == "raw":
        model.load_state_dict(read_raw_weights(source))
        return
    _, raw = read_weights(source)
    model.load_state_dict(load_checkpoint_state(io.BytesIO(raw)))


def eval_loop_per_worker(config: dict[str, Any]) -> None:
    """Reports "<i>.val_acc1" / acc5 / loss / count of each of config["sources"] ([checkpoint, weights] pairs) in one
    pass over the val split (split across workers, counts summed); config: cfg, sources."""
    cfg = TrainConfig.from_dict(config["cfg"])
    device = ray.train.torch.get_device()
    models = {}
    for i, (source, weights) in enumerate(config["sources"]):
        model = build_model(cfg.model, "finetune")
        load_eval_weights(model, source, weights)
        models[str(i)] = model.to(device)
    batches = iter_batches(ray.train.get_dataset_shard("val"), cfg.optim.batch_size, device, drop_last=False)
    results = evaluate(models, batches, precision=cfg.precision, distributed=True)
    metrics = {f"{i}.val_{k}": v for i, stats in results.items() for k, v in stats.items()}
    with tempfile.TemporaryDirectory(prefix="arm-eval-") as tmp:  # Ray Train V2 keeps metrics only with a checkpoint
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            Path(tmp, "eval.json").write_text(json.dumps({"sources": config["sources"], **metrics}))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def split_metrics(metrics: dict[str, Any], count: int) -> list[dict[str, float]]:
    """The reported {"<i>.val_acc1": ...} as one {"val_acc1": ...} dict per source, in order."""
    return [{k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{i}.")} for i in range(count)]
