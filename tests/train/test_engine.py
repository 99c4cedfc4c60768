"""Engine: training steps lower the loss, accumulation / clip / EMA paths run, evaluation counts are exact."""

import math

import pytest
import torch
from timm.utils import ModelEmaV3

from arm_platform.train.engine import evaluate, sum_over_workers, train_one_epoch
from arm_platform.train.optim import build_optimizer
from arm_platform.train.schedule import Schedule
from arm_platform.train.tasks import build_task


def _constant(lr: float) -> Schedule:
    return Schedule(peak_lr=lr, min_lr=lr, warmup_steps=0, total_steps=10**6)


def test_two_pretrain_steps_have_finite_decreasing_loss(pretrain_model, small_cfg, synthetic_batches):
    cfg = small_cfg("pretrain")
    task = build_task(cfg, pretrain_model)
    opt = build_optimizer(pretrain_model, cfg.optim, "pretrain")
    batch = synthetic_batches(1)[0]
    seen = []
    train_one_epoch(
        task,
        [batch] * 3,
        opt,
        _constant(1e-3),
        start_step=0,
        max_steps=3,
        clip_grad=3.0,
        on_step=lambda step, m: seen.append(m["loss"]),
    )
    assert len(seen) == 3 and all(math.isfinite(v) for v in seen)
    assert seen[2] < seen[1] < seen[0]


def test_finetune_steps_with_accumulation_and_ema(finetune_model, small_cfg, synthetic_batches):
    cfg = small_cfg("finetune")
    task = build_task(cfg, finetune_model)
    opt = build_optimizer(finetune_model, cfg.optim, "finetune")
    ema = ModelEmaV3(finetune_model, decay=0.5)
    before = [p.detach().clone() for p in ema.module.parameters()]
    steps = []
    stats = train_one_epoch(
        task,
        synthetic_batches(4),
        opt,
        _constant(1e-3),
        start_step=5,
        max_steps=10,
        accum_iter=2,
        ema=ema,
        on_step=lambda step, m: steps.append(step),
    )
    assert steps == [6, 7] and stats["steps"] == 2  # 4 micro-batches / accum 2, numbered from start_step
    assert any(not torch.equal(a, b) for a, b in zip(before, ema.module.parameters(), strict=True))


def test_non_finite_loss_stops_training(pretrain_model, small_cfg, synthetic_batches):
    cfg = small_cfg("pretrain")
    task = build_task(cfg, pretrain_model)
    opt = build_optimizer(pretrain_model, cfg.optim, "pretrain")
    batch = synthetic_batches(1)[0]
    bad = {"image": batch["image"] * float("nan"), "label": batch["label"]}
    with pytest.raises(RuntimeError, match="loss is nan"):
        train_one_epoch(task, [bad], opt, _constant(1e-3), start_step=0, max_steps=1)


def test_evaluate_counts_top1_and_top5():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):  # class scores 0..9 descending from class 0, independent of the input
            return torch.arange(10, 0, -1).float().expand(x.shape[0], 10)

    class Reversed(Fixed):
        def forward(self, x):  # class 9 first
            return -super().forward(x)

    batch = {"image": torch.zeros(4, 3, 2, 2), "label": torch.tensor([0, 3, 4, 9])}
    passes = []

    def val_batches():  # a generator: a second pass over it would see no batches
        passes.append(1)
        yield batch

    stats = evaluate({"model": Fixed(), "ema": Reversed()}, val_batches(), precision="fp32")
    assert len(passes) == 1  # both models scored in one pass over the data
    assert stats["model"]["acc1"] == pytest.approx(25.0) and stats["model"]["acc5"] == pytest.approx(75.0)
    assert stats["ema"]["acc1"] == pytest.approx(25.0) and stats["ema"]["acc5"] == pytest.approx(25.0)  # top-5: 9..5
    assert stats["model"]["count"] == stats["ema"]["count"] == 4
    expected_loss = torch.nn.functional.cross_entropy(Fixed()(batch["image"]), batch["label"]).item()
    assert stats["model"]["loss"] == pytest.approx(expected_loss)


def _sum_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        total = sum_over_workers(rank + 1, torch.device("cpu"))  # e.g. corrupt records seen by this worker
        torch.save(torch.tensor(total), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sum_over_workers_adds_every_rank_and_is_identity_alone(tmp_path):
    assert sum_over_workers(3, torch.device("cpu")) == 3.0
    out = str(tmp_path / "total")
    torch.multiprocessing.spawn(_sum_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2)
    assert [torch.load(f"{out}.{r}", weights_only=True).item() for r in range(2)] == [3.0, 3.0]
