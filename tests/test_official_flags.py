"""Every flag of the official ARM argparse (main_pretrain.py, Finetuning/main_finetune.py) is accepted with its official
meaning or refused with a message naming what to use on Ray.

The flag lists are ../shared/reference/official_flags.md as data: (flag, type / action, official default).
"""

import logging
from pathlib import Path

import pytest

from arm_platform import cli, recipes
from arm_platform.config import apply_overrides, flatten

PRETRAIN_FLAGS = [
    ("--batch_size", "int", "64"),
    ("--epochs", "int", "400"),
    ("--accum_iter", "int", "1"),
    ("--clip_grad", "float", "3.0"),
    ("--model", "str", "arm_base_pz16"),
    ("--input_size", "int", "192"),
    ("--norm_pix_loss", "store_true", ""),
    ("--weight_decay", "float", "0.05"),
    ("--lr", "float", None),
    ("--blr", "float", "1e-3"),
    ("--min_lr", "float", "0."),
    ("--warmup_epochs", "int", "40"),
    ("--data_path", "str", "/datasets01/imagenet_full_size/061417/"),
    ("--output_dir", "", "./output_dir"),
    ("--log_dir", "", "./output_dir"),
    ("--device", "", "cuda"),
    ("--seed", "int", "0"),
    ("--resume", "", ""),
    ("--start_epoch", "int", "0"),
    ("--num_workers", "int", "10"),
    ("--pin_mem", "store_true", ""),
    ("--no_pin_mem", "store_false", ""),
    ("--world_size", "int", "1"),
    ("--local-rank", "int", "-1"),
    ("--dist_on_itp", "store_true", ""),
    ("--dist_url", "", "env://"),
]
FINETUNE_FLAGS = [
    ("--batch_size", "int", "64"),
    ("--epochs", "int", "50"),
    ("--accum_iter", "int", "1"),
    ("--model", "str", "vit_large_patch16"),
    ("--input_size", "int", "224"),
    ("--drop_path", "float", "0.1"),
    ("--clip_grad", "float", None),
    ("--weight_decay", "float", "0.05"),
    ("--lr", "float", None),
    ("--blr", "float", "1e-3"),
    ("--layer_decay", "float", "0.75"),
    ("--min_lr", "float", "1e-6"),
    ("--warmup_epochs", "int", "5"),
    ("--color_jitter", "float", None),
    ("--aa", "str", "rand-m9-mstd0.5-inc1"),
    ("--smoothing", "float", "0.1"),
    ("--reprob", "float", "0.25"),
    ("--remode", "str", "pixel"),
    ("--recount", "int", "1"),
    ("--resplit", "store_true", "False"),
    ("--mixup", "float", "0"),
    ("--cutmix", "float", "0"),
    ("--cutmix_minmax", "float", None),
    ("--mixup_prob", "float", "1.0"),
    ("--mixup_switch_prob", "float", "0.5"),
    ("--mixup_mode", "str", "batch"),
    ("--finetune", "", ""),
    ("--global_pool", "bool", ""),
    ("--cls_token", "store_false", ""),
    ("--data_path", "str", "/datasets01/imagenet_full_size/061417/"),
    ("--nb_classes", "int", "1000"),
    ("--output_dir", "", "./output_dir"),
    ("--log_dir", "", "./output_dir"),
    ("--device", "", "cuda"),
    ("--seed", "int", "0"),
    ("--resume", "", ""),
    ("--start_epoch", "int", "0"),
    ("--eval", "store_true", ""),
    ("--dist_eval", "store_true", "False"),
    ("--num_workers", "int", "10"),
    ("--pin_mem", "store_true", ""),
    ("--no_pin_mem", "store_false", ""),
    ("--world_size", "int", "1"),
    ("--local_rank", "int", "-1"),
    ("--dist_on_itp", "store_true", ""),
    ("--dist_url", "", "env://"),
    ("--ema_decay", "float", ""),
]

# Values passed where the official default cannot be typed on a command line (None / empty) or would say nothing.
SAMPLE = {
    "--lr": "1e-3",
    "--clip_grad": "1.0",
    "--color_jitter": "0.4",
    "--cutmix_minmax": "0.2 0.8",
    "--ema_decay": "0.9999",
    "--resume": "runs/finetune_tiny-0123456789/checkpoint_000064",
    "--finetune": "runs/pretrain_tiny-0123456789/checkpoint_000064",
    "--global_pool": "True",
}
CKPT = SAMPLE["--resume"]
LOG_DB = f"sqlite:///{Path('./output_dir').resolve() / 'mlflow.db'}"

# flag -> how it lands here:
#   ("cfg", dotted key[, value]): the config value is the passed value parsed by the official type (or `value`)
#   ("intent", RunIntent field, value[, extra argv])
#   ("same", log text or None): accepted, config unchanged; `log text` is in the log line explaining the no-op
#   ("refused", regex): ValueError whose message names what to use instead
MEANING = {
    "--batch_size": ("cfg", "optim.batch_size"),
    "--epochs": ("cfg", "optim.epochs"),
    "--accum_iter": ("cfg", "optim.accum_iter"),
    "--clip_grad": ("cfg", "optim.clip_grad"),
    "--model": ("cfg", "model.name"),
    "--input_size": ("cfg", "model.img_size"),
    "--norm_pix_loss": ("same", None),
    "--weight_decay": ("cfg", "optim.weight_decay"),
    "--lr": ("cfg", "optim.lr"),
    "--blr": ("cfg", "optim.blr"),
    "--min_lr": ("cfg", "optim.min_lr"),
    "--warmup_epochs": ("cfg", "optim.warmup_epochs"),
    "--data_path": ("cfg", "data.data_path"),
    "--output_dir": ("cfg", "storage_path"),
    "--log_dir": ("cfg", "tracking.tracking_uri", LOG_DB),
    "--device": ("cfg", "cluster.use_gpu", True),
    "--seed": ("cfg", "seed"),
    "--resume": ("intent", "resume", CKPT),
    "--start_epoch": ("intent", "start_epoch", 0),
    "--num_workers": ("same", "--world_size N or cluster.num_workers=N"),
    "--pin_mem": ("same", "pinned"),
    "--no_pin_mem": ("same", "pinned"),
    "--world_size": ("cfg", "cluster.num_workers"),
    "--local-rank": ("same", "ranks"),
    "--local_rank": ("same", "ranks"),
    "--dist_on_itp": ("same", "torch.distributed"),
    "--dist_url": ("same", "rendezvous"),
    "--drop_path": ("cfg", "model.drop_path_rate"),
    "--layer_decay": ("cfg", "optim.layer_decay"),
    "--color_jitter": ("refused", r"--aa rand-m9-mstd0.5-inc1"),  # finetune_tiny has no RandAugment
    "--aa": ("cfg", "data.auto_augment"),
    "--smoothing": ("cfg", "data.smoothing"),
    "--reprob": ("cfg", "data.reprob"),
    "--remode": ("same", None),
    "--recount": ("same", None),
    "--resplit": ("same", "augmentation splits"),
    "--mixup": ("cfg", "data.mixup"),
    "--cutmix": ("cfg", "data.cutmix"),
    "--cutmix_minmax": ("refused", r"use --cutmix ALPHA"),
    "--mixup_prob": ("cfg", "data.mixup_prob"),
    "--mixup_switch_prob": ("cfg", "data.mixup_switch_prob"),
    "--mixup_mode": ("cfg", "data.mixup_mode"),
    "--finetune": ("cfg", "finetune"),
    "--global_pool": ("cfg", "model.global_pool", True),
    "--cls_token": ("cfg", "model.global_pool", False),
    "--nb_classes": ("cfg", "model.num_classes"),
    "--eval": ("intent", "eval_only", True, ["--resume", CKPT]),
    "--dist_eval": ("cfg", "data.dist_eval", True),
    "--ema_decay": ("cfg", "optim.ema_decay"),
}
FINETUNE_MEANING = {"--model": ("refused", r"unknown model 'vit_large_patch16'; valid models: .*arm_base_pz16")}

CASTS = {"int": int, "float": float, "str": str, "": str}


def test_the_lists_hold_all_73_official_flags_and_each_has_a_meaning():
    assert len(PRETRAIN_FLAGS) + len(FINETUNE_FLAGS) == 73
    assert {flag for flag, _, _ in PRETRAIN_FLAGS + FINETUNE_FLAGS} == set(MEANING)


def _argv(flag: str, kind: str, default: str | None) -> list[str]:
    if kind.startswith("store_"):
        return [flag]
    return [flag, *SAMPLE.get(flag, default).split(" ")]


def _expected(flag: str, kind: str, default: str | None, meaning: tuple):
    if len(meaning) > 2:
        return meaning[2]
    return CASTS[kind](SAMPLE.get(flag, default))


def _base(task: str, flag: str):
    """The tiny recipe, booleans set opposite to what the flags ask (each check sees a change), 100 epochs (room for the
    official warmup)."""
    changes = {"data.dist_eval": False, "model.global_pool": flag == "--cls_token", "optim.epochs": 100}
    return apply_overrides(recipes.get(f"{task}_tiny"), changes)


@pytest.mark.parametrize(
    ("task", "flag", "kind", "default"),
    [("pretrain", *row) for row in PRETRAIN_FLAGS] + [("finetune", *row) for row in FINETUNE_FLAGS],
    ids=[f"pretrain{row[0]}" for row in PRETRAIN_FLAGS] + [f"finetune{row[0]}" for row in FINETUNE_FLAGS],
)
def test_official_flag_is_accepted_with_its_meaning_or_refused_with_the_ray_way(task, flag, kind, default, caplog):
    meaning = (FINETUNE_MEANING if task == "finetune" else {}).get(flag, MEANING[flag])
    argv = _argv(flag, kind, default) + (meaning[3] if meaning[0] == "intent" and len(meaning) > 3 else [])
    base = _base(task, flag)
    if meaning[0] == "refused":
        with pytest.raises(ValueError, match=meaning[1]):
            cli.resolve(base, argv)
        return
    with caplog.at_level(logging.INFO, logger="arm_platform.cli"):
        cfg, intent = cli.resolve(base, argv)
    if meaning[0] == "cfg":
        assert flatten(cfg)[meaning[1]] == _expected(flag, kind, default, meaning), argv
    elif meaning[0] == "intent":
        assert getattr(intent, meaning[1]) == meaning[2]
    else:
        assert cfg == base, f"{argv} changed the config"
        if meaning[1] is not None:
            assert flag.replace("-rank", "_rank") in caplog.text and meaning[1] in caplog.text
