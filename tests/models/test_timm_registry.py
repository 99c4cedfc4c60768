"""timm conventions: `import arm_platform` registers the names, defaults follow the paper, pretrained_cfg is true."""

import os
import subprocess
import sys

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch import nn
from torchvision import transforms as T

from arm_platform import recipes
from arm_platform.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from arm_platform.models import REGISTERED_MODELS, model_config
from arm_platform.recipes import ARM_SIZES

CLASSIFIERS = [cfg.name for cfg in ARM_SIZES.values()]
PRETRAIN = [f"{name}_pretrain" for name in CLASSIFIERS]


def build_meta(name: str, **kwargs) -> nn.Module:
    """timm.create_model on the meta device (no memory, no init cost: geometry and cfg only)."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def test_import_arm_platform_alone_registers_the_names_without_ray_or_mlflow():
    """A fresh interpreter: `import arm_platform` then timm.create_model works; Ray / MLflow stay unimported."""
    code = (
        "import sys, torch, timm, arm_platform\n"
        "with torch.device('meta'):\n"
        "    m = timm.create_model('arm_base_pz16')\n"
        "print(type(m).__name__, sorted(timm.list_models('arm_*')) == sorted(arm_platform.models.REGISTERED_MODELS),\n"
        "      [k for k in ('ray', 'mlflow', 'mamba_ssm', 'causal_conv1d') if k in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.stdout.split() == ["ARMClassifier", "True", "[]"], out.stderr


def test_list_models_lists_every_classifier_and_pretrain_name():
    assert set(timm.list_models("arm_*")) == set(CLASSIFIERS + PRETRAIN) == set(REGISTERED_MODELS)
    assert timm.is_model("arm_huge_pz16_pretrain") and not timm.is_model("arm_base_pz8")


@pytest.mark.parametrize("name", CLASSIFIERS[1:])
def test_classifiers_default_to_the_paper_finetune_geometry(name):
    """224 px, 1000 classes, global pool, no drop path: the official finetune model at its default --input_size."""
    model = build_meta(name)
    assert (model.cfg.img_size, model.cfg.num_classes, model.head.out_features) == (224, 1000, 1000)
    assert model.pos_embed.shape[1] == 14 * 14 + 1 and model.global_pool is True
    assert model.pretrained_cfg["input_size"] == (3, 224, 224) and model.pretrained_cfg["num_classes"] == 1000


def test_arm_base_classifier_has_the_official_parameter_count():
    assert sum(p.numel() for p in build_meta("arm_base_pz16").parameters()) == 85_031_656


@pytest.mark.parametrize("name", PRETRAIN[1:])
def test_pretrain_names_default_to_192_px(name):
    model = build_meta(name)
    assert model.cfg.img_size == 192 and model.pos_embed.shape[1] == 12 * 12
    assert model.pretrained_cfg["input_size"] == (3, 192, 192)
    assert model.pretrained_cfg["num_classes"] == 0 and model.pretrained_cfg["classifier"] is None


def test_tiny_is_the_32px_ten_class_demo_model_for_both_names():
    """arm_tiny_pz4 is ours (CPU demo, Fashion-MNIST): its recipes, so its timm defaults, are 32 px / 10 classes."""
    clf, pre = build_meta("arm_tiny_pz4"), build_meta("arm_tiny_pz4_pretrain")
    assert (clf.cfg.img_size, clf.head.out_features, pre.cfg.img_size) == (32, 10, 32)
    assert recipes.get("finetune_tiny").model.num_classes == 10


@pytest.mark.parametrize("name", CLASSIFIERS + PRETRAIN)
def test_pretrained_cfg_describes_the_built_model(name):
    """input size, classes, first conv and classifier name match the modules; mean/std are what the data pipeline
    normalises with; the registered cfg (timm.models.get_pretrained_cfg) equals the built model's."""
    model = build_meta(name)
    cfg = model.pretrained_cfg
    mc = model.cfg
    assert cfg["input_size"] == (mc.in_chans, mc.img_size, mc.img_size) and cfg["fixed_input_size"]
    conv = model.get_submodule(cfg["first_conv"])
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == mc.in_chans and conv.kernel_size == (mc.patch_size,) * 2
    if cfg["classifier"] is not None:
        head = model.get_submodule(cfg["classifier"])
        assert isinstance(head, nn.Linear) and head.out_features == cfg["num_classes"] == mc.num_classes
    assert (tuple(cfg["mean"]), tuple(cfg["std"])) == (IMAGENET_MEAN, IMAGENET_STD)
    assert cfg["interpolation"] == "bicubic" and cfg["url"] == ""
    registered = timm.models.get_pretrained_cfg(name).to_dict()
    assert {k: registered[k] for k in cfg} == cfg


@pytest.mark.parametrize(("name", "img_size"), [("arm_base_pz16", 224), ("arm_base_pz16", 384), ("arm_tiny_pz4", 32)])
def test_timm_eval_transform_from_pretrained_cfg_is_the_official_eval_geometry(name, img_size):
    """resolve_data_config + create_transform give Resize((r, r)) then CenterCrop(img), r = eval_resize_for(img)."""
    model = build_meta(name, img_size=img_size)
    steps = create_transform(**resolve_data_config({}, model=model)).transforms
    resize, crop = steps[0], steps[1]
    r = recipes.eval_resize_for(img_size)
    assert isinstance(resize, T.Resize) and tuple(resize.size) == (r, r)
    assert isinstance(crop, T.CenterCrop) and tuple(crop.size) == (img_size, img_size)
    assert model.pretrained_cfg["crop_pct"] == (0.875 if img_size == 224 else pytest.approx(img_size / r))


def test_kwargs_override_defaults_the_timm_way():
    """ModelConfig fields, timm's global_pool strings, num_classes=0 and pretrained_cfg_overlay."""
    model = build_meta("arm_base_pz16", img_size=384, num_classes=0, global_pool="token", drop_path_rate=0.2)
    assert (model.cfg.img_size, model.cfg.global_pool, model.cfg.drop_path_rate) == (384, False, 0.2)
    assert isinstance(model.head, nn.Identity) and model.pretrained_cfg["input_size"] == (3, 384, 384)
    overlaid = build_meta("arm_small_pz16", pretrained_cfg_overlay={"notes": ("ours",)})
    assert overlaid.pretrained_cfg["notes"] == ("ours",) and overlaid.pretrained_cfg["num_classes"] == 1000


@pytest.mark.parametrize("recipe", sorted(recipes.RECIPES))
def test_recipes_are_the_timm_defaults_plus_their_training_fields(recipe):
    """Every recipe's model is its timm name's default config with only drop path / pooling / checkpointing changed,
    so `timm.create_model(name)` and the recipe agree on geometry and classes."""
    cfg = recipes.get(recipe)
    size = recipes.size_of(cfg.model.name)
    training = {k: getattr(cfg.model, k) for k in ("drop_path_rate", "global_pool", "grad_checkpointing")}
    assert model_config(size, cfg.task, **training) == cfg.model
    assert cfg.model.img_size == (32 if size == "tiny" else 192 if cfg.task == "pretrain" else 224)
