"""Recipes validate and round-trip; overrides cast by type and reject unknown keys; geometry is derived."""

import dataclasses

import pytest

from arm_platform import config, recipes
from arm_platform.config import ModelConfig, TrainConfig


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_every_recipe_round_trips_through_a_dict(name):
    cfg = recipes.get(name)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.recipe == name and cfg.task == name.split("_")[0]


def test_official_pretrain_geometry_is_derived_from_image_patch_and_cluster_size():
    model = recipes.get("pretrain_base").model
    assert (model.grid_size, model.num_clusters, model.patches_per_cluster, model.patch_dim) == (12, 9, 16, 768)
    assert model.tap_layers == (6, 8, 10, 12)
    assert recipes.get("pretrain_large").model.tap_layers == (12, 16, 20, 24)
    assert (model.dt_rank, model.swiglu_hidden) == (48, 2048)


def test_official_learning_rates_follow_the_mae_scaling_rule():
    base, large = recipes.get("pretrain_base"), recipes.get("pretrain_large")
    assert base.optim.effective_lr(base.cluster.num_workers) == pytest.approx(1.2e-3)
    assert large.optim.effective_lr(large.cluster.num_workers) == pytest.approx(6e-4)
    ft_large = recipes.get("finetune_large")
    assert ft_large.optim.effective_batch(ft_large.cluster.num_workers) == 1024
    assert ft_large.optim.effective_lr(ft_large.cluster.num_workers) == pytest.approx(2e-3)
    huge = recipes.get("pretrain_huge")
    assert huge.optim.effective_batch(huge.cluster.num_workers) == 2048 and huge.model.grad_checkpointing


def test_finetune_recipes_carry_the_official_regularisation():
    base = recipes.get("finetune_base")
    assert (base.optim.layer_decay, base.model.drop_path_rate, base.optim.ema_decay) == (0.65, 0.1, 0.99992)
    assert (base.data.mixup, base.data.cutmix, base.data.reprob, base.data.effective_eval_resize) == (
        0.8,
        1.0,
        0.25,
        256,
    )
    assert base.model.img_size == 224 and base.optim.betas == (0.9, 0.999)


def test_overrides_cast_by_field_type():
    cfg = config.apply_overrides(
        recipes.get("pretrain_tiny"),
        [
            "optim.blr=2e-4",
            "cluster.num_workers=3",
            "optim.clip_grad=none",
            "model.global_pool=false",
            "optim.betas=0.9,0.99",
            "data.data_path=s3://bucket/shards",
            "optim.epochs=1e1",
        ],
    )
    assert cfg.optim.blr == 2e-4 and cfg.cluster.num_workers == 3 and cfg.optim.clip_grad is None
    assert cfg.model.global_pool is False and cfg.optim.betas == (0.9, 0.99) and cfg.optim.epochs == 10
    assert cfg.data.data_path == "s3://bucket/shards"


def test_unknown_override_key_names_the_closest_valid_key():
    with pytest.raises(ValueError, match="did you mean 'blr'"):
        config.apply_overrides(recipes.get("pretrain_tiny"), ["optim.blrr=1"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        config.apply_overrides(recipes.get("pretrain_tiny"), ["optim.blr"])
    with pytest.raises(ValueError, match="expected"):
        config.apply_overrides(recipes.get("pretrain_tiny"), ["optim.epochs=many"])


def test_invalid_geometry_is_rejected_with_the_numbers_in_the_message():
    with pytest.raises(ValueError, match="not divisible by patch_size 16"):
        config.apply_overrides(recipes.get("pretrain_base"), ["model.img_size=200"])
    with pytest.raises(ValueError, match="not divisible by cluster_size 5"):
        config.apply_overrides(recipes.get("pretrain_base"), ["model.cluster_size=5"])
    # finetuning does not cluster, so any patch-divisible size works
    ft = config.apply_overrides(
        recipes.get("finetune_base"), ["model.img_size=384", "data.input_size=384", "data.eval_resize=384"]
    )
    assert ft.model.grid_size == 24


def test_unknown_recipe_lists_valid_names():
    with pytest.raises(ValueError, match="pretrain_base"):
        recipes.get("pretrain_gigantic")


def test_flatten_gives_dotted_scalar_params():
    flat = config.flatten(recipes.get("finetune_base"))
    assert flat["optim.blr"] == 5e-4 and flat["model.name"] == "arm_base_pz16"
    assert all(not isinstance(v, dict) for v in flat.values())


def test_size_of_maps_model_names_to_sizes():
    assert recipes.size_of("arm_huge_pz16") == "huge" and recipes.size_of("arm_tiny_pz4_pretrain") == "tiny"
    with pytest.raises(ValueError, match="unknown model"):
        recipes.size_of("vit_large_patch16")


def test_model_config_is_a_slotted_dataclass():
    assert not hasattr(ModelConfig(name="x", embed_dim=8, depth=1), "__dict__")
    assert dataclasses.is_dataclass(ModelConfig)


def test_input_size_must_match_the_model_image_size():
    with pytest.raises(ValueError, match="data.input_size 224 != model.img_size 384"):
        config.apply_overrides(recipes.get("finetune_base"), ["model.img_size=384"])
