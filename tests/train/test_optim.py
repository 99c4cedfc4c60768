"""Param groups: official add_weight_decay (pretrain) and layer-wise lr decay scales (finetune)."""

import dataclasses

import pytest

from arm_platform import recipes
from arm_platform.models import build_model
from arm_platform.train.optim import build_optimizer, finetune_param_groups, pretrain_param_groups


def _small(task: str):
    cfg = recipes.get(f"{task}_tiny").model
    return build_model(dataclasses.replace(cfg, embed_dim=32, depth=3), task)


def _names_by_decay(model, groups):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {g["weight_decay"]: {ids[id(p)] for p in g["params"]} for g in groups}


def test_pretrain_groups_decay_a_log_conv_and_ar_token_but_not_bias_or_1d():
    model = _small("pretrain")
    by_decay = _names_by_decay(model, pretrain_param_groups(model, 0.05))
    decay, no_decay = by_decay[0.05], by_decay[0.0]
    assert "layers.0.mixer.A_log" in decay and "layers.0.mixer.conv1d.weight" in decay and "ar_token" in decay
    assert "layers.0.mixer.D" in no_decay and "layers.0.mixer.conv1d.bias" in no_decay
    assert all(not n.endswith(".bias") for n in decay)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & (decay | no_decay)  # fixed sin-cos tables are not optimised
    assert decay | no_decay == {n for n, p in model.named_parameters() if p.requires_grad}


def test_finetune_layer_scales_equal_official_layer_decay():
    model = _small("finetune")
    depth, decay = 3, 0.65
    groups = finetune_param_groups(model, 0.05, decay)
    ids = {id(p): n for n, p in model.named_parameters()}
    scale_of = {ids[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    wd_of = {ids[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    num_layers = depth + 1  # official util/lr_decay.py
    assert scale_of["patch_embed.proj.weight"] == pytest.approx(decay ** (num_layers - 0))
    assert scale_of["pos_embed"] == pytest.approx(decay**num_layers)
    for i in range(depth):
        assert scale_of[f"layers.{i}.mixer.in_proj.weight"] == pytest.approx(decay ** (num_layers - (i + 1)))
    assert scale_of["head.weight"] == pytest.approx(1.0) and scale_of["norm_f.weight"] == pytest.approx(1.0)
    assert wd_of["pos_embed"] == 0.0 and wd_of["cls_token"] == 0.0 and wd_of["head.bias"] == 0.0
    assert wd_of["layers.0.mixer.A_log"] == 0.05 and wd_of["head.weight"] == 0.05


def test_build_optimizer_uses_recipe_betas():
    cfg = recipes.get("pretrain_tiny")
    opt = build_optimizer(_small("pretrain"), cfg.optim, "pretrain")
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    ft = recipes.get("finetune_tiny")
    assert build_optimizer(_small("finetune"), ft.optim, "finetune").defaults["betas"] == (0.9, 0.999)
