"""Official `--eval --resume CKPT`: evaluate a checkpoint on the val split on Ray Train workers and print top-1/top-5.

The checkpoint is a run checkpoint folder (`<output_dir>/<run>/checkpoint_<step>`, local or s3://, verified against
its manifest; its model.pt is the EMA copy when EMA was on) or an official finetuned `checkpoint-N.pth`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

from arm_platform import launch, storage
from arm_platform.config import TrainConfig


def evaluate_checkpoint(cfg: TrainConfig, checkpoint: str, weights: str = "model") -> dict[str, float]:
    """val_acc1 / val_acc5 / val_loss / val_count of `checkpoint`; prints the official summary line.

    weights: "model" (model.pt: the EMA copy when EMA was on) or "raw" (a run checkpoint's raw model, state.pt).
    """
    return evaluate_checkpoints(cfg, [(checkpoint, weights)])[0]


def evaluate_checkpoints(cfg: TrainConfig, sources: Sequence[tuple[str, str]]) -> list[dict[str, float]]:
    """`evaluate_checkpoint` of each (checkpoint, weights) in one pass over the val split: one Ray Train start and one
    decode of the images for all of them (the demo scores both arms' winners so). Every source is checked first."""
    if not sources:
        raise ValueError("nothing to evaluate: no (checkpoint, weights) given")
    import ray.train
    from ray.train.torch import TorchTrainer

    from arm_platform.data.datasets import build_datasets
    from arm_platform.train.checkpoint import pretrained_source
    from arm_platform.train.eval_loop import eval_loop_per_worker, split_metrics

    for checkpoint, weights in sources:
        if weights not in ("model", "raw"):
            raise ValueError(f"weights must be model or raw, got {weights!r}")
        try:
            pretrained_source(checkpoint)
        except ValueError as err:
            raise ValueError(f"--eval --resume {checkpoint}: {err}") from err
    plan = launch.validate(cfg)
    launch.init_ray()
    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker} | ({"GPU": c.gpus_per_worker} if c.use_gpu else {})
    fs, root = storage.filesystem_for(plan.storage_path)
    tag = hashlib.sha256(repr([tuple(s) for s in sources]).encode()).hexdigest()[:8]
    trainer = TorchTrainer(
        eval_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "sources": [list(s) for s in sources]},
        scaling_config=ray.train.ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=f"eval-{plan.run_name}-{tag}-{int(time.time())}", storage_path=root, storage_filesystem=fs
        ),
        datasets={"val": build_datasets(cfg.data, cfg.task, plan.manifest)["val"]},
        dataset_config=ray.train.DataConfig(datasets_to_split=["val"]),
    )
    results = split_metrics(trainer.fit().metrics, len(sources))
    for metrics in results:
        print(
            f"* Acc@1 {metrics['val_acc1']:.3f} Acc@5 {metrics['val_acc5']:.3f} loss {metrics['val_loss']:.3f}\n"
            f"Accuracy of the network on the {int(metrics['val_count'])} test images: {metrics['val_acc1']:.1f}%",
            flush=True,
        )
    return results
