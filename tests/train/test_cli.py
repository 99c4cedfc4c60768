"""Official flags and dotted overrides map onto TrainConfig fields."""

import pytest

from arm_platform import cli, recipes


def test_official_pretrain_flags_map_to_config():
    cfg, dry = cli.apply_cli(
        recipes.get("pretrain_base"),
        [
            "--model",
            "arm_large_pz16",
            "--batch_size",
            "128",
            "--epochs",
            "1600",
            "--warmup_epochs",
            "40",
            "--blr",
            "1.5e-4",
            "--weight_decay",
            "0.05",
            "--norm_pix_loss",
            "--data_path",
            "s3://b/in1k",
            "--output_dir",
            "s3://b/runs",
            "--accum_iter",
            "2",
            "--clip_grad",
            "3.0",
            "--num_workers",
            "8",
            "--use_gpu",
            "--experiment_name",
            "exp1",
            "optim.min_lr=1e-6",
        ],
    )
    assert not dry
    assert (cfg.model.name, cfg.model.embed_dim, cfg.model.depth) == ("arm_large_pz16", 1024, 24)
    assert (cfg.optim.batch_size, cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.blr) == (128, 1600, 40, 1.5e-4)
    assert (cfg.optim.accum_iter, cfg.optim.clip_grad, cfg.optim.min_lr) == (2, 3.0, 1e-6)
    assert (cfg.data.data_path, cfg.storage_path, cfg.experiment_name) == ("s3://b/in1k", "s3://b/runs", "exp1")
    assert cfg.cluster.num_workers == 8 and cfg.cluster.use_gpu


def test_official_finetune_flags_map_to_config():
    cfg, dry = cli.apply_cli(
        recipes.get("finetune_base"),
        [
            "--finetune",
            "ckpt.pth",
            "--layer_decay",
            "0.75",
            "--ema_decay",
            "0.9999",
            "--drop_path",
            "0.3",
            "--reprob",
            "0.1",
            "--mixup",
            "0.5",
            "--cutmix",
            "0.0",
            "--smoothing",
            "0.2",
            "--cls_token",
            "--no-dist_eval",
            "--input_size",
            "384",
            "--lr",
            "1e-3",
            "--dry-run",
        ],
    )
    assert dry and cfg.finetune == "ckpt.pth"
    assert (cfg.optim.layer_decay, cfg.optim.ema_decay, cfg.model.drop_path_rate) == (0.75, 0.9999, 0.3)
    assert (cfg.data.reprob, cfg.data.mixup, cfg.data.cutmix, cfg.data.smoothing) == (0.1, 0.5, 0.0, 0.2)
    assert cfg.model.global_pool is False and cfg.data.dist_eval is False
    assert (cfg.model.img_size, cfg.data.input_size, cfg.data.eval_resize) == (384, 384, 384)
    assert cfg.optim.effective_lr(8) == 1e-3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "arm_gigantic"], "unknown model 'arm_gigantic'"),
        (["--bogus_flag", "1"], "unknown flag"),
        (["optim.blrr=1"], "did you mean 'blr'"),
    ],
)
def test_bad_arguments_raise_value_error(argv, message):
    with pytest.raises(ValueError, match=message):
        cli.apply_cli(recipes.get("pretrain_tiny"), argv)
