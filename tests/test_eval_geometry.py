"""Eval geometry (resize r, center crop input) follows the input size by one rule for every recipe."""

import pytest

from arm_platform import recipes
from arm_platform.config import DataConfig, apply_overrides
from arm_platform.data.transforms import image_fn


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_every_recipe_resizes_by_the_official_crop_pct(name):
    """r = round(input / 0.875): 192 -> 219 (pretrain), 224 -> 256 (finetune), 32 -> 37 (tiny)."""
    cfg = recipes.get(name)
    expected = {192: 219, 224: 256, 32: 37}[cfg.data.input_size]
    assert cfg.data.effective_eval_resize == expected == recipes.eval_resize_for(cfg.data.input_size)


def test_input_size_override_moves_the_eval_resize_with_it():
    """A derived eval_resize follows --input_size; an explicit one stays as given."""
    cfg = apply_overrides(recipes.get("pretrain_tiny"), ["data.input_size=64", "model.img_size=64"])
    assert cfg.data.effective_eval_resize == 73
    assert DataConfig(input_size=32, eval_resize=40).effective_eval_resize == 40
    assert "effective_eval_resize" not in cfg.to_dict()["data"]


def test_eval_transform_keeps_most_of_a_small_image():
    """pretrain_tiny's eval crop keeps (32/37)^2 = 75% of a 28 px image, not its middle 1.6% (resize 256 -> crop 32)."""
    import numpy as np
    import torch

    cfg = recipes.get("pretrain_tiny").data
    img = torch.zeros(3, 28, 28, dtype=torch.uint8)
    img[:, 7:21, 7:21] = 200  # a garment in the middle half of the frame on a black background
    out = image_fn(cfg, "eval")(img, np.random.default_rng(0))
    assert out.shape == (3, 32, 32)
    assert out[:, :4].max() < 20 and out[:, 16, 16].min() > 190  # black margin in view, garment in the centre
