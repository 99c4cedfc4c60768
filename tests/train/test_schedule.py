"""lr schedule: closed form of warmup + half-cosine, and per-group lr_scale."""

import math

import pytest
import torch

from arm_platform import recipes
from arm_platform.train.schedule import apply_lr, build_schedule, lr_at


@pytest.mark.parametrize("step", [0, 1, 5, 9.5])
def test_warmup_is_linear(step):
    assert lr_at(step, peak_lr=1e-3, min_lr=1e-6, warmup_steps=10, total_steps=100) == pytest.approx(1e-3 * step / 10)


@pytest.mark.parametrize("step", [10, 37, 55, 99, 100])
def test_cosine_matches_official_formula(step):
    expected = 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (step - 10) / 90))
    assert lr_at(step, peak_lr=1e-3, min_lr=1e-6, warmup_steps=10, total_steps=100) == pytest.approx(expected)


def test_schedule_peaks_at_warmup_end_and_ends_at_min_lr():
    cfg = recipes.get("finetune_base")
    sched = build_schedule(cfg.optim, num_workers=8, steps_per_epoch=1251)
    assert sched.peak_lr == pytest.approx(5e-4 * 1024 / 256)  # MAE rule: blr * effective batch / 256
    assert sched.warmup_steps == 5 * 1251 and sched.total_steps == 100 * 1251
    assert sched.lr_at(sched.warmup_steps) == pytest.approx(sched.peak_lr)
    assert sched.lr_at(sched.total_steps) == pytest.approx(1e-6)


def test_apply_lr_multiplies_each_group_by_its_scale():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr_scale": 0.25}, {"params": [b]}], lr=0.0)
    apply_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(5e-4), pytest.approx(2e-3)]
