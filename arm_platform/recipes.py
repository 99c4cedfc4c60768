"""Every number of every recipe: model sizes, pretraining and finetuning hyperparameters.

Sources: OliverRensu/ARM README / main_pretrain.py / main_finetune.py (see ../shared/reference/arm_spec.md §1, §2, §5).
Recipes are functions returning a fresh TrainConfig, named "{task}_{size}"; `get(name)` looks one up.
"""

from __future__ import annotations

import dataclasses
from functools import partial

from arm_platform.config import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrackingConfig,
    TrainConfig,
)

EVAL_CROP_PCT = 224 / 256
"""Official eval: resize to input / crop_pct, center-crop input. Every recipe leaves `data.eval_resize` unset, so
`DataConfig.effective_eval_resize` applies `eval_resize_for(input_size)`: 224 -> 256, 192 -> 219, 32 -> 37."""

ARM_SIZES: dict[str, ModelConfig] = {
    # Ours (not in the ARM repo): a CPU demo size for 32 px images; geometry still exercises every code path.
    "tiny": ModelConfig(
        name="arm_tiny_pz4",
        embed_dim=128,
        depth=6,
        img_size=32,
        patch_size=4,
        cluster_size=2,
        decoder_dim=128,
        decoder_depth=2,
        decoder_head_dim=32,
        num_classes=10,
        target_chans=1,  # Fashion-MNIST: gray images stored as RGB; predict the gray patch, not three copies
    ),
    # Ours: ViT-S-like width, official patch / cluster / decoder geometry.
    "small": ModelConfig(name="arm_small_pz16", embed_dim=384, depth=12),
    "base": ModelConfig(name="arm_base_pz16", embed_dim=768, depth=12),  # models_pretrain.py arm_base_pz16
    "large": ModelConfig(name="arm_large_pz16", embed_dim=1024, depth=24),  # arm_large_pz16
    "huge": ModelConfig(name="arm_huge_pz16", embed_dim=1536, depth=24),  # arm_huge_pz16
}

# size -> (batch per GPU, accum_iter, workers). Official README: base 256 x 8 GPUs, large 128 x 8 GPUs.
# huge has no official recipe: 64 per 80 GB GPU with accumulation x4 reaches base's effective batch of 2048.
_PRETRAIN_BATCH = {
    "tiny": (64, 1, 2),
    "small": (256, 1, 8),
    "base": (256, 1, 8),
    "large": (128, 1, 8),
    "huge": (64, 4, 8),
}

# size -> (batch per GPU, accum_iter, layer_decay, drop_path). Official README: base 128x1 0.65 0.1,
# large 32x4 0.75 0.3; huge / small are ours (MAE ViT-H / ViT-B values).
_FINETUNE_TABLE = {
    "tiny": (64, 1, 0.75, 0.05),
    "small": (128, 1, 0.65, 0.1),
    "base": (128, 1, 0.65, 0.1),
    "large": (32, 4, 0.75, 0.3),
    "huge": (32, 4, 0.75, 0.3),
}

FASHION_MNIST_SHARDS = "./data/fashion-mnist"
"""Where `jobs/prepare_data.py --dataset fashion-mnist` writes the embedded dataset by default."""
FASHION_MNIST_SHARD_MB = 2.0
"""Small shards for the 28 px set (~2.7k images each) so Ray Data decodes several in parallel."""

DEMO_LABELS = 1000
"""Few-label demo: labelled train images per arm (Fashion-MNIST splits "labelled" / "heldout", see fashion_mnist)."""

FINETUNE_IMG_SIZE = 224
PRETRAIN_PROBE_IMAGES = 10_000
"""Pretraining monitors: labelled train images in the kNN / linear-probe bank, and val images scored."""


def eval_resize_for(input_size: int) -> int:
    """Official eval resize: round(input / crop_pct) (224 -> 256, 192 -> 219, 32 -> 37); crop_pct 1 above 224
    (384 -> 384). The one rule for every recipe and for timm's pretrained_cfg (`models.factory`)."""
    return round(input_size / EVAL_CROP_PCT) if input_size <= 224 else input_size


def _cluster(size: str, num_workers: int) -> ClusterConfig:
    if size == "tiny":
        return ClusterConfig(num_workers=num_workers, use_gpu=False, cpus_per_worker=0.5)
    return ClusterConfig(num_workers=num_workers, use_gpu=True, cpus_per_worker=8.0)


def pretrain(size: str) -> TrainConfig:
    """ARM pretraining (README): 1600 epochs, warmup 40, blr 1.5e-4, wd 0.05, AdamW(0.9, 0.95), clip 3.0, 192 px."""
    batch, accum, workers = _PRETRAIN_BATCH[size]
    model = dataclasses.replace(ARM_SIZES[size], grad_checkpointing=(size == "huge"))
    optim = OptimConfig(
        batch_size=batch,
        accum_iter=accum,
        epochs=1600,
        warmup_epochs=40,
        blr=1.5e-4,
        weight_decay=0.05,
        betas=(0.9, 0.95),
        clip_grad=3.0,
    )
    # Pretraining reads val (and the probe bank, the first max_val_samples train images) only for the monitors, on
    # rank 0: 10k images each, not all 1.28M train images re-encoded on one rank at every probe.
    data = DataConfig(input_size=model.img_size, min_crop_scale=0.2, max_val_samples=PRETRAIN_PROBE_IMAGES)
    tracking = TrackingConfig(vis_every_n_epochs=20, probe_every_n_epochs=20)
    if size == "tiny":  # a few CPU minutes on the embedded Fashion-MNIST shards
        optim = dataclasses.replace(optim, epochs=4, warmup_epochs=1, blr=1.5e-3)
        data = dataclasses.replace(
            data,
            data_path=FASHION_MNIST_SHARDS,
            min_crop_scale=0.5,
            max_train_samples=4096,
            max_val_samples=1000,
            decode_cpus=0.25,
        )
        tracking = TrackingConfig(log_every_n_steps=10, vis_every_n_epochs=2, probe_every_n_epochs=2)
    return TrainConfig(
        recipe=f"pretrain_{size}",
        task="pretrain",
        model=model,
        data=data,
        optim=optim,
        cluster=_cluster(size, workers),
        tracking=tracking,
        checkpoint=CheckpointConfig(every_n_steps=0 if size == "tiny" else 5000, num_to_keep=3),
    )


def finetune(size: str) -> TrainConfig:
    """ARM finetuning (README): 100 epochs, warmup 5, blr 5e-4, EMA 0.99992, mixup 0.8, cutmix 1.0, RandAugment."""
    batch, accum, layer_decay, drop_path = _FINETUNE_TABLE[size]
    img_size = ARM_SIZES[size].img_size if size == "tiny" else FINETUNE_IMG_SIZE
    model = dataclasses.replace(ARM_SIZES[size], img_size=img_size, drop_path_rate=drop_path, global_pool=True)
    optim = OptimConfig(
        batch_size=batch,
        accum_iter=accum,
        epochs=100,
        warmup_epochs=5,
        blr=5e-4,
        min_lr=1e-6,
        weight_decay=0.05,
        betas=(0.9, 0.999),
        clip_grad=None,
        layer_decay=layer_decay,
        ema_decay=0.99992,
    )
    data = DataConfig(
        input_size=img_size,
        min_crop_scale=0.08,
        auto_augment="rand-m9-mstd0.5-inc1",
        reprob=0.25,
        mixup=0.8,
        cutmix=1.0,
        smoothing=0.1,
    )
    if size == "tiny":  # minutes on CPU: light augmentation, short EMA horizon
        optim = dataclasses.replace(optim, epochs=4, warmup_epochs=0.5, blr=4e-3, ema_decay=0.99)
        data = dataclasses.replace(
            data,
            data_path=FASHION_MNIST_SHARDS,
            auto_augment=None,
            reprob=0.0,
            mixup=0.0,
            cutmix=0.0,
            min_crop_scale=0.5,
            max_train_samples=2048,
            max_val_samples=1000,
            decode_cpus=0.25,
        )
    return TrainConfig(
        recipe=f"finetune_{size}",
        task="finetune",
        model=model,
        data=data,
        optim=optim,
        cluster=_cluster(size, 8 if size != "tiny" else 2),
        checkpoint=CheckpointConfig(num_to_keep=2, score_attribute="val_best_acc1", score_order="max"),
        # LP-FT at small label counts: a random head's first gradients distort the pretrained features (README demo)
        head_init="probe" if size == "tiny" else "random",
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoPlan:
    """The README demo's numbers (`demo.run`): dotted overrides of pretrain_tiny / finetune_tiny and the lr grid."""

    pretrain: dict
    finetune: dict
    lrs: tuple[float, ...]
    """Peak finetune lrs searched, the same grid for every arm (optim.lr: absolute, global batch 2 x 64)."""
    trial_workers: int = 1
    """Train workers per finetune trial, at the finetune config's global batch: on 2 cores two 1-worker trials run
    side by side (`sweep.max_concurrent_trials`), so one trial's start-up and evaluation overlap the other's steps."""


_DEMO_PRETRAIN = {
    # all 60,000 train images, no labels; probes: the 1,000 "labelled" images -> the 10,000 test images ("val")
    "data.max_train_samples": None,
    "data.probe_split": "labelled",
    "data.max_val_samples": None,
    "optim.warmup_epochs": 0.1,
    "tracking.probe_every_n_epochs": 1,
    "tracking.vis_every_n_epochs": 1,
}
_DEMO_FINETUNE = {
    # LP-FT on the 1,000 "labelled" images, hyperparameters picked on 500 of the 1,000 "heldout" ones
    "data.train_split": "labelled",
    "data.val_split": "heldout",
    "data.max_train_samples": None,
    "data.max_val_samples": 500,
    "data.train_repeats": 2,  # 2 passes over the 1,000 images per epoch: 15 steps of 2 x 64
    "optim.epochs": 1,
}
DEMO = {
    # `make demo`: <= 30 min on 2 cores
    "short": DemoPlan(pretrain=_DEMO_PRETRAIN | {"optim.epochs": 1}, finetune=_DEMO_FINETUNE, lrs=(2.5e-4, 1e-3)),
    # `make demo DEMO_ARGS=--long`: twice the pretraining (2 epochs, probed at the end) and twice the finetuning
    # (30 steps, a heldout score per epoch)
    "long": DemoPlan(
        pretrain=_DEMO_PRETRAIN
        | {"optim.epochs": 2, "tracking.probe_every_n_epochs": 2, "tracking.vis_every_n_epochs": 2},
        finetune=_DEMO_FINETUNE | {"optim.epochs": 2},
        lrs=(2.5e-4, 1e-3),
    ),
}


RECIPES = {
    f"{task}_{size}": partial(fn, size)
    for task, fn in (("pretrain", pretrain), ("finetune", finetune))
    for size in ARM_SIZES
}


def get(name: str) -> TrainConfig:
    """A fresh copy of recipe `name`; ValueError listing the valid names otherwise."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]()


def size_of(model_name: str) -> str:
    """Size key of a timm model name ("arm_base_pz16" or "arm_base_pz16_pretrain" -> "base")."""
    for size, cfg in ARM_SIZES.items():
        if model_name in (cfg.name, f"{cfg.name}_pretrain"):
            return size
    valid = sorted(c.name for c in ARM_SIZES.values())
    raise ValueError(f"unknown model {model_name!r}; valid models: {', '.join(valid)} (and each + '_pretrain')")


# Tune search spaces as data: dotted TrainConfig key -> (sampler, *args); `search_space.build_param_space` turns
# them into ray.tune samplers ("loguniform"/"uniform": low, high; "choice"/"grid": values; "randint": low,
# high-exclusive).
# Centred on the official finetune values (blr 5e-4, layer_decay 0.65-0.75, drop_path 0.1-0.3, mixup 0.8, cutmix 1.0).
SEARCH_SPACES: dict[str, dict[str, tuple]] = {
    "finetune": {
        "optim.blr": ("loguniform", 1e-4, 2e-3),
        "optim.layer_decay": ("uniform", 0.55, 0.85),
        "model.drop_path_rate": ("uniform", 0.0, 0.3),
        "data.mixup": ("choice", [0.0, 0.2, 0.8]),
        "data.cutmix": ("choice", [0.0, 0.5, 1.0]),
        "optim.weight_decay": ("loguniform", 0.01, 0.1),
        "optim.ema_decay": ("choice", [0.9998, 0.9999, 0.99992]),
    },
    # CPU demo / tests on finetune_tiny: two knobs, a few minutes per trial.
    "finetune_tiny": {
        "optim.blr": ("loguniform", 3e-4, 3e-3),
        "optim.layer_decay": ("uniform", 0.6, 0.9),
    },
}
