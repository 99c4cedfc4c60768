"""Why full finetuning lost ~9 points to a linear probe at 1,000 labels, measured (plain PyTorch, no Ray).

Each row finetunes the tiny classifier with the finetune_tiny recipe's own pieces (layer-decay AdamW, warmup +
cosine schedule, label smoothing, drop path, EMA) for the same number of steps on the 1,000 "labelled" Fashion-MNIST
images (random resized crop + flip, as the recipe), changing one thing at a time: the head's start (the official
random init vs a linear probe of the frozen features: LP-FT), the peak lr, and the starting encoder (ARM-pretrained
vs random init). Scored on the first --test images of the 10,000 test images (eval transform).

    python benchmarks/lpft_study.py --checkpoint runs/<pretrain run>/checkpoint_<step> [--steps 120]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from arm_platform import recipes
from arm_platform.config import apply_overrides
from arm_platform.data import fashion_mnist
from arm_platform.data.transforms import eval_image_fn, normalize, pretrain_image_fn
from arm_platform.models import build_model
from arm_platform.train.checkpoint import load_pretrained_weights
from arm_platform.train.engine import evaluate, train_one_epoch
from arm_platform.train.optim import build_optimizer
from arm_platform.train.probes import init_head_from_probe
from arm_platform.train.schedule import build_schedule
from arm_platform.train.tasks import build_task

# (name, start from the checkpoint?, head_init, peak lr); lr 0 trains nothing: the head alone (a linear probe)
ROWS = [
    ("linear probe (LP), pretrained", True, "probe", 0.0),
    ("FT random head, pretrained, lr 1e-3", True, "random", 1e-3),
    ("FT random head, pretrained, lr 4e-3", True, "random", 4e-3),
    ("LP-FT, pretrained, lr 2.5e-4", True, "probe", 2.5e-4),
    ("LP-FT, pretrained, lr 1e-3", True, "probe", 1e-3),
    ("LP-FT, pretrained, lr 4e-3", True, "probe", 4e-3),
    ("FT random head, scratch, lr 4e-3", False, "random", 4e-3),
    ("LP-FT, scratch, lr 4e-3", False, "probe", 4e-3),
]


def _images(split: str, limit: int | None, fn, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, 32, 32) through `fn` (an ImageFn of data.transforms), labels (N,)."""
    x, y = fashion_mnist.load_split(split, limit=limit)
    rng = np.random.default_rng(seed)
    imgs = [fn(torch.from_numpy(img).expand(3, -1, -1).contiguous(), rng) for img in x]
    return torch.from_numpy(np.stack(imgs)), torch.from_numpy(y)


def _batches(images: torch.Tensor, labels: torch.Tensor, batch: int, shuffle: bool, seed: int = 0):
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)) if shuffle else None
    idx = order if order is not None else torch.arange(len(labels))
    for i in range(0, len(idx) - (batch - 1 if shuffle else 0), batch):
        j = idx[i : i + batch]
        yield {"image": normalize(images[j]), "label": labels[j]}


def run_row(args, cfg, data, from_pretrained: bool, head_init: str, lr: float) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(cfg.model, "finetune")
    if from_pretrained:
        load_pretrained_weights(model, args.checkpoint)
    train_eval, labels, train_fn_imgs, test = data
    if head_init == "probe":
        smoothing = args.head_smoothing if args.head_smoothing is not None else cfg.data.smoothing
        init_head_from_probe(
            model, _batches(train_eval, labels, 250, False), l2=1e-3, max_iter=100, smoothing=smoothing
        )
    if lr > 0:
        spe = len(labels) // cfg.optim.batch_size
        epochs = -(-args.steps // spe)
        optim = dataclasses.replace(cfg.optim, lr=lr, epochs=epochs)
        opt = build_optimizer(model, optim, "finetune")
        schedule = build_schedule(optim, num_workers=1, steps_per_epoch=spe)
        task = build_task(cfg, model)
        step = 0
        for epoch in range(epochs):
            imgs = train_fn_imgs(epoch)
            stats = train_one_epoch(
                task, _batches(imgs, labels, cfg.optim.batch_size, True, epoch), opt, schedule,
                start_step=step, max_steps=min(spe, args.steps - step), precision="fp32",
            )  # fmt: skip
            step += stats["steps"]
    return evaluate({"m": model}, _batches(*test, 250, False), precision="fp32")["m"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="pretrain checkpoint folder (or model.pt) of arm_tiny")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per finetune (batch 64)")
    parser.add_argument("--test", type=int, default=10_000, help="test images scored")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="", help="comma-separated row indices (default: all)")
    parser.add_argument("--head-smoothing", type=float, default=None, help="LP head's label smoothing (recipe's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(recipes.get("finetune_tiny"), {"optim.batch_size": 64})
    d = cfg.data
    eval_fn = eval_image_fn(d.input_size, d.effective_eval_resize, d.interpolation)
    train_aug = pretrain_image_fn(d.input_size, d.min_crop_scale, d.hflip, d.interpolation)  # RRC + flip
    n = recipes.DEMO_LABELS
    train_eval, labels = _images("train", n, eval_fn, 0)
    test = _images("val", args.test, eval_fn, 0)
    data = (train_eval, labels, lambda epoch: _images("train", n, train_aug, 1 + epoch)[0], test)
    rows = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    print(f"{n} labels, {args.steps} steps x batch 64, {len(test[1])} test images, {args.threads} threads")
    print(f"{'run':40s} {'top-1':>6s} {'loss':>6s} {'min':>5s}")
    for name, pretrained, head, lr in rows:
        t0 = time.perf_counter()
        stats = run_row(args, cfg, data, pretrained, head, lr)
        print(
            f"{name:40s} {stats['acc1']:6.1f} {stats['loss']:6.3f} {(time.perf_counter() - t0) / 60:5.1f}", flush=True
        )


if __name__ == "__main__":
    main()
