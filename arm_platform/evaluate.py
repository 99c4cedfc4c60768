"""Official `--eval --resume CKPT`: evaluate a checkpoint on the val split on Ray Train workers and print top-1/top-5.

The checkpoint is a run checkpoint folder (`<output_dir>/<run>/checkpoint_<step>`, local or s3://, verified against
its manifest; its model.pt is the EMA copy when EMA was on) or an official finetuned `checkpoint-N.pth`.
"""

from __future__ import annotations

import hashlib
import time

from arm_platform import launch, storage
from arm_platform.config import TrainConfig


def evaluate_checkpoint(cfg: TrainConfig, checkpoint: str, weights: str = "model") -> dict[str, float]:
    """val_acc1 / val_acc5 / val_loss / val_count of `checkpoint`; prints the official summary line.

    weights: "model" (model.pt: the EMA copy when EMA was on) or "raw" (a run checkpoint's raw model, state.pt).
    """
    if weights not in ("model", "raw"):
        raise ValueError(f"weights must be model or raw, got {weights!r}")
    import ray.train
    from ray.train.torch import TorchTrainer

    from arm_platform.data.datasets import build_datasets
    from arm_platform.train.checkpoint import pretrained_source
    from arm_platform.train.eval_loop import eval_loop_per_worker

    plan = launch.validate(cfg)
    try:
        pretrained_source(checkpoint)
    except ValueError as err:
        raise ValueError(f"--eval --resume {checkpoint}: {err}") from err
    launch.init_ray()
    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker} | ({"GPU": c.gpus_per_worker} if c.use_gpu else {})
    fs, root = storage.filesystem_for(plan.storage_path)
    tag = hashlib.sha256(f"{checkpoint}|{weights}".encode()).hexdigest()[:8]
    trainer = TorchTrainer(
        eval_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "checkpoint": checkpoint, "weights": weights},
        scaling_config=ray.train.ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=f"eval-{plan.run_name}-{tag}-{int(time.time())}", storage_path=root, storage_filesystem=fs
        ),
        datasets={"val": build_datasets(cfg.data, cfg.task, plan.manifest)["val"]},
        dataset_config=ray.train.DataConfig(datasets_to_split=["val"]),
    )
    metrics = trainer.fit().metrics
    print(
        f"* Acc@1 {metrics['val_acc1']:.3f} Acc@5 {metrics['val_acc5']:.3f} loss {metrics['val_loss']:.3f}\n"
        f"Accuracy of the network on the {int(metrics['val_count'])} test images: {metrics['val_acc1']:.1f}%",
        flush=True,
    )
    return metrics
