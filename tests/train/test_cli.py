"""Official flags and dotted overrides map onto TrainConfig fields and a RunIntent (all 73 flags:
tests/test_official_flags.py); here the value-dependent cases."""

import logging
from pathlib import Path

import pytest

from arm_platform import cli, recipes
from arm_platform.config import apply_overrides


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
            "--world_size",
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
    assert (cfg.model.img_size, cfg.data.input_size, cfg.data.effective_eval_resize) == (384, 384, 384)
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


def test_num_workers_keeps_its_official_meaning_and_world_size_sets_ray_workers(caplog):
    """--num_workers counted DataLoader processes: a no-op here that says how to set Ray Train workers."""
    base = recipes.get("pretrain_tiny")
    with caplog.at_level(logging.WARNING, logger="arm_platform.cli"):
        cfg, _ = cli.resolve(base, ["--num_workers", "16"])
    assert cfg.cluster.num_workers == base.cluster.num_workers == 2
    assert "--world_size N or cluster.num_workers=N" in caplog.text
    assert cli.resolve(base, ["--world_size", "4"])[0].cluster.num_workers == 4


@pytest.mark.parametrize(("device", "use_gpu"), [("cuda", True), ("cuda:1", True), ("CPU", False)])
def test_device_sets_gpu_workers(device, use_gpu):
    assert cli.resolve(recipes.get("finetune_base"), ["--device", device])[0].cluster.use_gpu is use_gpu


@pytest.mark.parametrize(
    ("log_dir", "uri"),
    [
        ("logs", f"sqlite:///{Path('logs').resolve() / 'mlflow.db'}"),
        ("http://mlflow:5000", "http://mlflow:5000"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ],
)
def test_log_dir_is_the_mlflow_store(log_dir, uri):
    assert cli.resolve(recipes.get("pretrain_tiny"), ["--log_dir", log_dir])[0].tracking.tracking_uri == uri


def test_accepted_values_of_partly_supported_flags():
    """--remode pixel / --recount 1 are what random erasing does; --color_jitter is unused under --aa (official);
    `--global_pool key=value` leaves the override alone."""
    base = recipes.get("finetune_base")
    argv = ["--remode", "pixel", "--recount", "1", "--color_jitter", "0.4", "--resplit", "--global_pool", "True"]
    cfg, intent = cli.resolve(base, argv)
    assert cfg == base and intent == cli.RunIntent()
    cfg, _ = cli.resolve(
        apply_overrides(recipes.get("finetune_tiny"), {"model.global_pool": False}), ["--global_pool", "optim.blr=1e-3"]
    )
    assert cfg.model.global_pool is True and cfg.optim.blr == 1e-3


def test_resume_start_epoch_and_eval_travel_in_the_run_intent():
    ckpt = "s3://b/runs/finetune_base-0123456789/checkpoint_001000"
    cfg, intent = cli.resolve(recipes.get("finetune_base"), ["--resume", ckpt, "--start_epoch", "7", "--dry-run"])
    assert intent == cli.RunIntent(dry_run=True, resume=ckpt, start_epoch=7, eval_only=False)
    assert cfg == recipes.get("finetune_base")
    _, intent = cli.resolve(recipes.get("finetune_base"), ["--eval", "--resume", "official-finetuned.pth"])
    assert intent.eval_only and intent.resume == "official-finetuned.pth"


@pytest.mark.parametrize(
    ("recipe", "argv", "message"),
    [
        ("finetune_tiny", ["--device", "mps"], "pass --device cuda or cpu"),
        ("pretrain_tiny", ["--log_dir", "s3://b/logs"], "MLFLOW_TRACKING_URI"),
        ("pretrain_tiny", ["--output_dir", ""], "pass a folder or s3:// URI"),
        ("finetune_tiny", ["--global_pool", "False"], "--cls_token"),
        ("finetune_tiny", ["--global_pool", "--cls_token"], "pass one of them"),
        ("finetune_tiny", ["--remode", "const"], r"--reprob \(--remode pixel is accepted\)"),
        ("finetune_tiny", ["--recount", "2"], "--recount 1 is accepted"),
        ("finetune_tiny", ["--start_epoch", "5"], "pass --resume"),
        ("finetune_tiny", ["--start_epoch", "five"], "expected an integer"),
        ("finetune_tiny", ["--eval"], "--resume CKPT"),
        ("pretrain_tiny", ["--eval", "--resume", "ckpt"], "knn_acc1"),
        ("finetune_tiny", ["--resume", "checkpoint-99.pth"], "--finetune"),
    ],
)
def test_unsupported_values_are_refused_with_the_ray_way(recipe, argv, message):
    with pytest.raises(ValueError, match=message):
        cli.resolve(recipes.get(recipe), argv)


def test_apply_cli_is_for_fresh_runs_only():
    """Sweeps call apply_cli: a trial cannot resume or evaluate one checkpoint."""
    cfg, dry = cli.apply_cli(recipes.get("finetune_tiny"), ["--dry-run", "--world_size", "1"])
    assert dry and cfg.cluster.num_workers == 1
    with pytest.raises(ValueError, match="jobs/finetune.py"):
        cli.apply_cli(recipes.get("finetune_tiny"), ["--resume", "runs/x/checkpoint_000010"])
