"""The README demo flow (`make demo`, `jobs/demo.py`): a recipe flow built on `launch.fit`, not part of the launcher.

Pretrain the tiny model on Fashion-MNIST (CPU), finetune from its checkpoint and from scratch with the same recipe;
returns the top-1 accuracies (plus the pretraining kNN accuracy).
"""

from __future__ import annotations

import dataclasses
import logging

from arm_platform import launch, recipes, storage
from arm_platform.config import apply_overrides

log = logging.getLogger(__name__)


def _ensure_fashion_mnist(data_path: str) -> None:
    if storage.exists(storage.join(data_path, "manifest.json")):
        return
    from arm_platform.data import fashion_mnist

    log.info("writing Fashion-MNIST shards to %s", data_path)
    fashion_mnist.prepare(data_path)


def run(overrides: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
    """README flow: pretrain the tiny model on Fashion-MNIST (CPU, minutes), finetune from its checkpoint and from
    scratch with the same recipe; returns and logs both top-1 accuracies (plus the pretraining kNN accuracy)."""
    pre_cfg, _ = launch.prepare(recipes.get("pretrain_tiny"), overrides)
    _ensure_fashion_mnist(pre_cfg.data.data_path)
    pretrained = launch.fit(pre_cfg)
    checkpoint_uri = _checkpoint_uri(pretrained)
    ft_cfg, _ = launch.prepare(recipes.get("finetune_tiny"), [o for o in overrides if not o.startswith("model.")])
    ft_cfg = dataclasses.replace(
        ft_cfg,
        storage_path=pre_cfg.storage_path,
        data=dataclasses.replace(ft_cfg.data, data_path=pre_cfg.data.data_path),
    )
    scores = {"pretrain_knn_acc1": (pretrained.metrics or {}).get("knn_acc1", float("nan"))}
    for label, init in (("from_pretrained", checkpoint_uri), ("from_scratch", "")):
        result = launch.fit(apply_overrides(ft_cfg, {"finetune": init}))
        scores[f"{label}_acc1"] = result.metrics["val_acc1"]
        scores[f"{label}_ema_acc1"] = result.metrics.get("val_ema_acc1", float("nan"))
    log.info("demo: %s", scores)
    return scores


def _checkpoint_uri(result) -> str:  # noqa: ANN001 (ray.train.Result)
    """URI of a Result's latest checkpoint (s3:// prefix restored for S3 storage)."""
    path = result.checkpoint.path
    fs = getattr(result.checkpoint, "filesystem", None)
    return f"s3://{path}" if fs is not None and fs.type_name == "s3" else path
