"""The README demo (`make demo`, `jobs/demo.py`): ARM's claim in miniature on Fashion-MNIST, on CPU.

1. Pretrain arm_tiny with ARM on all 60,000 train images, no labels (`recipes.DEMO`). The run's last probe fits
   linear heads on the 1,000 "labelled" images' frozen features and scores them on the 10,000 test images ("val"),
   for the pretrained encoder AND the run's own random-init encoder (and the raw pixels); it also logs the val
   loss beside the loss of the best constant predictor.
2. One Ray Tune grid sweep: finetune_tiny (LP-FT: head from a linear probe, then full finetuning) on the 1,000
   labelled images, {from the pretrained checkpoint, from scratch} x the same lr grid; picked on 500 of the 1,000
   "heldout" train images (never on the test images). Trials of one worker each (same global batch) run side by side.
3. Each arm's best trial (its raw or EMA weights, whichever won on heldout) scored once on the 10,000 test images
   (both arms in one evaluation pass).

Every number of the printed table comes from this run (MLflow keeps them all).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from arm_platform import launch, recipes, storage
from arm_platform.config import TrainConfig, apply_overrides
from arm_platform.data import fashion_mnist

log = logging.getLogger(__name__)

SCRATCH = ""
"""The sweep's `finetune` value of the from-scratch arm."""


def ensure_dataset(data_path: str, few_labels: int = recipes.DEMO_LABELS) -> None:
    """Write the Fashion-MNIST shards (with the few-label splits) unless `data_path` already has them."""
    manifest_uri = storage.join(data_path, "manifest.json")
    if storage.exists(manifest_uri):
        from arm_platform.data.manifest import read_manifest

        missing = [s for s in fashion_mnist.FEW_LABEL_SPLITS if s not in read_manifest(data_path).shards]
        if not missing:
            return
        log.info("%s has no %s split: writing the shards again", data_path, "/".join(missing))
    log.info("writing Fashion-MNIST shards to %s", data_path)
    fashion_mnist.prepare(data_path, few_labels=few_labels)


def configs(plan: recipes.DemoPlan, overrides: list[str] | tuple[str, ...] = ()) -> tuple[TrainConfig, TrainConfig]:
    """(pretrain, finetune) configs of the demo: the tiny recipes + the plan's overrides + the user's (both runs, so
    a `model.*` override keeps the classifier's encoder the shape of the pretrained one)."""
    pre_cfg, _ = launch.prepare(apply_overrides(recipes.get("pretrain_tiny"), plan.pretrain), overrides)
    ft_cfg, _ = launch.prepare(apply_overrides(recipes.get("finetune_tiny"), plan.finetune), overrides)
    ft_cfg = dataclasses.replace(
        ft_cfg,
        storage_path=pre_cfg.storage_path,
        data=dataclasses.replace(ft_cfg.data, data_path=pre_cfg.data.data_path),
    )
    return pre_cfg, ft_cfg


def run(
    overrides: list[str] | tuple[str, ...] = (), *, long: bool = False, plan: recipes.DemoPlan | None = None
) -> dict[str, Any]:
    """Pretrain, sweep both finetune arms, score each arm's winner on the test images; returns the table's numbers.

    plan: the demo's settings (default `recipes.DEMO["long" if long else "short"]`).
    """
    from arm_platform.data.manifest import read_manifest

    plan = plan or recipes.DEMO["long" if long else "short"]
    started = time.perf_counter()
    pre_cfg, ft_cfg = configs(plan, overrides)
    ensure_dataset(pre_cfg.data.data_path)
    counts = read_manifest(pre_cfg.data.data_path).counts
    pretrained = launch.fit(pre_cfg)
    pre = pretrained.metrics or {}
    ckpt = _checkpoint_uri(pretrained)
    scores: dict[str, Any] = {
        "pretrain_images": counts[pre_cfg.data.train_split],
        "labels": counts[ft_cfg.data.train_split],
        "heldout": min(counts[ft_cfg.data.val_split], ft_cfg.data.max_val_samples or counts[ft_cfg.data.val_split]),
        "pretrain_steps": pre.get("step"),
        "pretrain_val_loss": pre.get("val_loss"),
        "loss_constant_baseline": pre.get("loss_constant_baseline"),
        "probe_pretrained": pre.get("probe_acc1"),
        "probe_random_init": pre.get("probe_acc1_random_init"),
        "probe_pixels": pre.get("probe_acc1_pixels"),
        "knn_pretrained": pre.get("knn_acc1"),
        "knn_random_init": pre.get("knn_acc1_random_init"),
    }
    results = _sweep(per_trial(ft_cfg, plan.trial_workers), ckpt, plan.lrs)
    inits = {"finetune_pretrained": ckpt, "finetune_scratch": SCRATCH}
    arms = {arm: [r for r in results if r.config.get("finetune") == init] for arm, init in inits.items()}
    scores |= _score_arms(ft_cfg, arms)
    scores["wall_minutes"] = (time.perf_counter() - started) / 60
    log.info("demo: %s", scores)
    return scores


def per_trial(ft_cfg: TrainConfig, workers: int) -> TrainConfig:
    """ft_cfg on `workers` Train workers at the same global batch (batch_size x num_workers x accum_iter)."""
    global_batch = ft_cfg.optim.batch_size * ft_cfg.cluster.num_workers
    if global_batch % workers:
        raise ValueError(f"the global batch {global_batch} does not split over {workers} trial workers")
    return dataclasses.replace(
        ft_cfg,
        cluster=dataclasses.replace(ft_cfg.cluster, num_workers=workers),
        optim=dataclasses.replace(ft_cfg.optim, batch_size=global_batch // workers),
    )


def _sweep(ft_cfg: TrainConfig, ckpt: str, lrs: tuple[float, ...]):  # noqa: ANN202 (ray.tune.ResultGrid)
    from arm_platform import sweep

    space = {"finetune": ("grid", [ckpt, SCRATCH]), "optim.lr": ("grid", list(lrs))}
    name = f"demo-sweep-{launch.config_hash(ft_cfg)}"
    # no early stopping: every arm x lr trains its full schedule (grace period = epochs)
    return sweep.tune(ft_cfg, space, num_samples=1, sweep_name=name, grace_period=ft_cfg.optim.epochs)


def _score_arms(ft_cfg: TrainConfig, results: dict[str, list]) -> dict[str, Any]:
    """Each arm's best trial on heldout (raw or EMA weights) scored on the test images, all in one evaluation pass."""
    from arm_platform.evaluate import evaluate_checkpoints
    from arm_platform.sweep_tracking import best_trial

    best = {arm: best_trial(arm_results) for arm, arm_results in results.items()}
    test_cfg = apply_overrides(ft_cfg, {"data.val_split": "val", "data.max_val_samples": None})
    # model.pt is the EMA copy when EMA is on; "raw" reads the checkpoint's state.pt model
    sources = [(b["checkpoint_uri"], "model" if b["weights"] == "ema" else "raw") for b in best.values()]
    scores: dict[str, Any] = {}
    for (arm, b), test in zip(best.items(), evaluate_checkpoints(test_cfg, sources), strict=True):
        scores |= {
            arm: test["val_acc1"],
            f"{arm}_lr": b["config"].get("optim.lr"),
            f"{arm}_weights": b["weights"],
            f"{arm}_heldout": b["score"],
            f"{arm}_steps": int(b["metrics"].get("step", 0)),
            "test_images": int(test["val_count"]),
        }
    return scores


def table(scores: dict[str, Any]) -> str:
    """The demo's printed table: every arm on the 10,000 test images, baselines beside them."""

    def pct(key: str) -> str:
        value = scores.get(key)
        return f"{value:5.1f}" if isinstance(value, int | float) else "  n/a"

    def ft(arm: str) -> str:
        lr, weights, steps = (scores.get(f"{arm}_{k}") for k in ("lr", "weights", "steps"))
        return f"(lr {lr}, {steps} steps, {weights} weights; held-out {pct(arm + '_heldout').strip()})"

    return "\n".join(
        [
            f"ARM demo: Fashion-MNIST, pretraining on {scores.get('pretrain_images', 0):,} unlabelled images, "
            f"{scores.get('labels', 0):,} labels (lr picked on {scores.get('heldout', 0):,} held-out), "
            f"top-1 % on the {scores.get('test_images', 0):,} test images",
            f"  linear probe, ARM-pretrained encoder   {pct('probe_pretrained')}",
            f"  linear probe, random-init encoder      {pct('probe_random_init')}   (baseline)",
            f"  linear probe, raw pixels               {pct('probe_pixels')}   (baseline)",
            f"  finetune (LP-FT) from ARM pretraining  {pct('finetune_pretrained')}   {ft('finetune_pretrained')}",
            f"  finetune (LP-FT) from scratch          {pct('finetune_scratch')}   {ft('finetune_scratch')}",
            f"  kNN, pretrained / random-init          {pct('knn_pretrained')} / {pct('knn_random_init')}",
            f"pretraining: {scores.get('pretrain_steps')} steps, val loss {scores.get('pretrain_val_loss', 0):.4f} "
            f"vs best constant predictor {scores.get('loss_constant_baseline', 0):.4f}",
            f"wall time {scores.get('wall_minutes', 0):.1f} min",
        ]
    )


def _checkpoint_uri(result) -> str:  # noqa: ANN001 (ray.train.Result)
    """URI of a Result's latest checkpoint (s3:// prefix restored for S3 storage)."""
    path = result.checkpoint.path
    fs = getattr(result.checkpoint, "filesystem", None)
    return f"s3://{path}" if fs is not None and fs.type_name == "s3" else path
