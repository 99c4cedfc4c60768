"""Checkpoint round trip: files present, weights_only loadable, resumed training reproduces the next step."""

import copy

import pytest
import torch
from timm.utils import ModelEmaV3

from arm_platform import recipes
from arm_platform.config import TrainConfig
from arm_platform.train.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    STATE_FILE,
    load_checkpoint,
    load_config,
    save_checkpoint,
)
from arm_platform.train.engine import train_one_epoch
from arm_platform.train.integrity import MANIFEST_FILE
from arm_platform.train.optim import build_optimizer
from arm_platform.train.schedule import Schedule
from arm_platform.train.tasks import build_task

SCHEDULE = Schedule(peak_lr=1e-3, min_lr=0.0, warmup_steps=2, total_steps=10)


def _step(cfg, model, opt, ema, start):
    """One optimizer step on a batch drawn from the global RNG (so restored RNG state matters)."""
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.randint(0, 10, (4,))}
    train_one_epoch(build_task(cfg, model), [batch], opt, SCHEDULE, start_step=start, max_steps=1, ema=ema)


def test_resume_gives_identical_next_step(tmp_path, finetune_model, small_cfg, synthetic_batches):
    cfg = small_cfg("finetune")
    model, opt = finetune_model, build_optimizer(finetune_model, cfg.optim, "finetune")
    ema = ModelEmaV3(model, decay=0.9)
    for step in range(2):
        _step(cfg, model, opt, ema, step)
    save_checkpoint(
        tmp_path, model=model, optimizer=opt, step=2, epoch=0, config=cfg.to_dict(), ema=ema, schedule=SCHEDULE
    )
    assert {p.name for p in tmp_path.iterdir()} == {STATE_FILE, MODEL_FILE, CONFIG_FILE, MANIFEST_FILE}
    reference = copy.deepcopy(model)
    ref_opt = build_optimizer(reference, cfg.optim, "finetune")
    ref_opt.load_state_dict(opt.state_dict())
    _step(cfg, reference, ref_opt, None, 2)  # continue without a restart

    from arm_platform.models import build_model

    resumed = build_model(cfg.model, "finetune")
    res_opt = build_optimizer(resumed, cfg.optim, "finetune")
    res_ema = ModelEmaV3(resumed, decay=0.9)
    torch.manual_seed(1234)  # scrambled; load_checkpoint restores the saved RNG
    assert load_checkpoint(tmp_path, model=resumed, optimizer=res_opt, ema=res_ema) == {"step": 2, "epoch": 0}
    _step(cfg, resumed, res_opt, None, 2)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(ema.module.state_dict().values(), res_ema.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert TrainConfig.from_dict(load_config(tmp_path)) == cfg


def _save_with_marked_ema(folder, model, cfg) -> None:
    """A checkpoint of `model` whose EMA copy differs from it: every EMA head bias is 7.0."""
    opt = build_optimizer(model, cfg.optim, "finetune")
    ema = ModelEmaV3(model, decay=0.9)
    with torch.no_grad():
        ema.module.head.bias.fill_(7.0)
    save_checkpoint(folder, model=model, optimizer=opt, step=0, epoch=0, config={}, ema=ema)


def test_model_file_is_the_ema_weights_and_loads_weights_only(tmp_path, finetune_model, small_cfg, synthetic_batches):
    _save_with_marked_ema(tmp_path, finetune_model, small_cfg("finetune"))
    state = torch.load(tmp_path / MODEL_FILE, weights_only=True)
    assert torch.all(state["head.bias"] == 7.0)
    full = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert set(full) >= {"model", "ema", "optimizer", "scaler", "schedule", "step", "epoch", "rng"}
    assert not list(tmp_path.glob("*.tmp"))


def test_finetune_weights_that_are_not_a_state_dict_are_refused_naming_the_file(tmp_path, finetune_model):

    from arm_platform.train.checkpoint import load_pretrained_weights

    bad = tmp_path / "weights.pth"
    torch.save([1, 2, 3], bad)
    with pytest.raises(ValueError, match=f"cannot load pretrained weights from {bad}"):
        load_pretrained_weights(finetune_model, str(bad))


def test_raw_weights_of_a_checkpoint_are_the_model_not_the_ema_and_are_verified(tmp_path, finetune_model, small_cfg):
    """--eval's weights="raw": state.pt["model"] (sha256-checked), not model.pt's EMA copy."""

    from arm_platform.train.checkpoint import read_raw_weights
    from arm_platform.train.integrity import CheckpointError

    _save_with_marked_ema(tmp_path, finetune_model, small_cfg("finetune"))
    raw = read_raw_weights(str(tmp_path))
    assert set(raw) == set(finetune_model.state_dict())
    assert all(torch.equal(v, finetune_model.state_dict()[k]) for k, v in raw.items())
    assert not torch.all(raw["head.bias"] == 7.0)
    with (tmp_path / STATE_FILE).open("r+b") as f:  # one flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="state.pt does not match its sha256"):
        read_raw_weights(str(tmp_path))


def test_evaluate_checkpoints_rejects_bad_sources_before_ray_starts(tmp_path):
    from arm_platform.evaluate import evaluate_checkpoints

    cfg = recipes.get("finetune_tiny")
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_checkpoints(cfg, [])
    with pytest.raises(ValueError, match="weights must be model or raw, got 'ema'"):
        evaluate_checkpoints(cfg, [(str(tmp_path), "model"), (str(tmp_path), "ema")])
