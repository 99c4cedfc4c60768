"""Checkpoint loading (weights_only with argparse.Namespace) and the pretrain -> finetune mapping."""

import argparse
import dataclasses
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

from arm_platform.models import ARMClassifier, ARMPretrain, build_model
from arm_platform.models.convert import load_checkpoint_state, load_pretrained, pretrain_to_finetune, resize_pos_embed
from arm_platform.recipes import ARM_SIZES

DIRECTION_PARAMS = {
    "A_log": "A{}_log",
    "D": "D{}",
    "conv1d.weight": "conv1d{}.weight",
    "conv1d.bias": "conv1d{}.bias",
    "x_proj.weight": "x_proj{}.weight",
    "dt_proj.weight": "dt_proj{}.weight",
    "dt_proj.bias": "dt_proj{}.bias",
}


class NotAllowed:
    """A pickled global that weights_only loading must refuse."""


def official_checkpoint(state_dict, path, **extra):
    """Write a dict laid out like OliverRensu/ARM utils/misc.py save_model."""
    args = argparse.Namespace(model="arm_base_pz16", batch_size=256, blr=1.5e-4, input_size=192, norm_pix_loss=True)
    torch.save(
        {
            "model": state_dict,
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 1599,
            "scaler": {"scale": 65536.0},
            "args": args,
            **extra,
        },
        path,
    )
    return path


@pytest.fixture
def pretrained(make_cfg):
    """A tiny pretraining model: 32 px, patch 4 (8x8 grid), 16 clusters of 4."""
    return ARMPretrain(make_cfg(img_size=32, patch_size=4, cluster_size=2))


def test_round_trip_from_an_official_style_checkpoint(tmp_path, make_cfg, pretrained):
    """All 4 directions start as copies of the forward weights, pos embed is resized, only cls/norm_f/head miss."""
    path = official_checkpoint(pretrained.state_dict(), tmp_path / "checkpoint-1599.pth")
    model = ARMClassifier(make_cfg(img_size=48, patch_size=4))  # 12x12 grid: interpolation 8 -> 12
    missing, unexpected = load_pretrained(model, path)
    assert sorted(missing) == ["cls_token", "head.bias", "head.weight", "norm_f.bias", "norm_f.weight"]
    assert unexpected == []
    src, dst = pretrained.state_dict(), model.state_dict()
    for i in range(pretrained.cfg.depth):
        for base, pattern in DIRECTION_PARAMS.items():
            for suffix in ("", "_b", "_c", "_c_b"):
                key = f"layers.{i}.mixer.{pattern.format(suffix)}"
                assert torch.equal(dst[key], src[f"layers.{i}.mixer.{base}"]), key
        for key in ("mixer.in_proj.weight", "mixer.out_proj.weight", "mlp.w3.bias", "norm2.weight"):
            assert torch.equal(dst[f"layers.{i}.{key}"], src[f"layers.{i}.{key}"])
    assert torch.equal(dst["patch_embed.proj.weight"], src["patch_embed.proj.weight"])
    grid = src["pos_embed"].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert dst["pos_embed"].shape == (1, 145, 16)
    torch.testing.assert_close(dst["pos_embed"][:, :72], resized[:, :72])
    torch.testing.assert_close(dst["pos_embed"][:, 73:], resized[:, 72:])
    assert torch.all(dst["pos_embed"][:, 72] == 0)  # zero cls position at N // 2
    assert torch.all(dst["head.bias"] == 0) and dst["head.weight"].std() < 1e-4


def test_same_grid_keeps_the_table_and_module_prefix_is_stripped(make_cfg, pretrained):
    """No interpolation when the grids agree; DDP `module.` prefixes disappear; finetune dicts pass through."""
    sd = {f"module.{k}": v for k, v in pretrained.state_dict().items()}
    model = ARMClassifier(make_cfg(img_size=32, patch_size=4))
    mapped = pretrain_to_finetune(sd, model)
    table = pretrained.pos_embed
    torch.testing.assert_close(mapped["pos_embed"], torch.cat([table[:, :32], torch.zeros(1, 1, 16), table[:, 32:]], 1))
    assert not any(k.startswith(("module.", "dec_block", "enc2dec", "norm_1", "ar_")) for k in mapped)
    assert set(pretrain_to_finetune(model.state_dict(), model)) == set(model.state_dict())
    cls_pos = resize_pos_embed(model.pos_embed.detach(), 6)  # a finetune table keeps its cls vector
    assert cls_pos.shape == (1, 37, 16) and torch.equal(cls_pos[:, 18], model.pos_embed[:, 32].detach())


def test_model_ema_and_plain_state_dicts(tmp_path, pretrained):
    """use_ema picks 'model_ema'; a plain state_dict file loads as is; a dict without 'model' is a ValueError."""
    sd = pretrained.state_dict()
    ema = {k: v + 1 for k, v in sd.items()}
    path = official_checkpoint(sd, tmp_path / "ckpt.pth", model_ema=ema)
    assert torch.equal(load_checkpoint_state(path, use_ema=True)["ar_token"], ema["ar_token"])
    assert torch.equal(load_checkpoint_state(path)["ar_token"], sd["ar_token"])
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    assert set(load_checkpoint_state(buf)) == set(sd)
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth.*'model'"):
        load_checkpoint_state(tmp_path / "other.pth")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unsafe_or_broken_files_raise_value_error_naming_the_file(tmp_path, pretrained):
    """Pickled globals other than argparse.Namespace are refused (weights_only=True); so is a non-torch file."""
    path = official_checkpoint(pretrained.state_dict(), tmp_path / "evil.pth", extra=NotAllowed())
    with pytest.raises(ValueError, match=r"evil\.pth.*weights_only"):
        load_checkpoint_state(path)
    with open(tmp_path / "pickle.pth", "wb") as f:
        pickle.dump({"model": {}}, f)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    for name in ("pickle.pth", "garbage.pth"):
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load_checkpoint_state(tmp_path / name)


def test_mismatched_widths_are_a_value_error(make_cfg, pretrained):
    """Loading weights of another width is reported before load_state_dict fails obscurely."""
    with pytest.raises(ValueError, match="does not fit"):
        load_pretrained(ARMClassifier(make_cfg(embed_dim=32, img_size=32, patch_size=4)), pretrained.state_dict())


@pytest.mark.parametrize("img_size", [224, 384])
def test_official_base_mapping_fits_the_finetune_model(img_size):
    """Base pretrain keys (meta) map onto the 224 / 384 classifier: 12x12 -> 14x14 / 24x24, cls at N // 2."""
    with torch.device("meta"):
        pre = build_model(ARM_SIZES["base"], "pretrain")
        model = build_model(dataclasses.replace(ARM_SIZES["base"], img_size=img_size), "finetune")
        mapped = pretrain_to_finetune(pre.state_dict(), model)
    target = model.state_dict()
    assert set(target) - set(mapped) == {"cls_token", "norm_f.weight", "norm_f.bias", "head.weight", "head.bias"}
    assert set(mapped) <= set(target)
    assert all(mapped[k].shape == target[k].shape for k in mapped)
    assert mapped["pos_embed"].shape == (1, (img_size // 16) ** 2 + 1, 768)
