"""Command-line flags: the official ARM `main_pretrain.py` / `main_finetune.py` names with the same meaning, the Ray
ones, and `key.sub=value` dotted overrides, all mapped onto a TrainConfig via `config.apply_overrides`.

`--norm_pix_loss` is accepted for compatibility: the norm-pix target is always on, as in the official code.
`--num_workers` is the number of Ray Train workers (the official flag counted DataLoader processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from arm_platform import recipes
from arm_platform.config import TrainConfig, apply_overrides

# official / Ray flag -> dotted TrainConfig key(s)
FLAG_KEYS: dict[str, tuple[str, ...]] = {
    "batch_size": ("optim.batch_size",),
    "epochs": ("optim.epochs",),
    "warmup_epochs": ("optim.warmup_epochs",),
    "blr": ("optim.blr",),
    "lr": ("optim.lr",),
    "min_lr": ("optim.min_lr",),
    "weight_decay": ("optim.weight_decay",),
    "accum_iter": ("optim.accum_iter",),
    "clip_grad": ("optim.clip_grad",),
    "layer_decay": ("optim.layer_decay",),
    "ema_decay": ("optim.ema_decay",),
    "data_path": ("data.data_path",),
    "output_dir": ("storage_path",),
    "input_size": ("data.input_size", "model.img_size"),
    "finetune": ("finetune",),
    "drop_path": ("model.drop_path_rate",),
    "reprob": ("data.reprob",),
    "mixup": ("data.mixup",),
    "cutmix": ("data.cutmix",),
    "smoothing": ("data.smoothing",),
    "global_pool": ("model.global_pool",),
    "dist_eval": ("data.dist_eval",),
    "seed": ("seed",),
    "num_workers": ("cluster.num_workers",),
    "use_gpu": ("cluster.use_gpu",),
    "cpus_per_worker": ("cluster.cpus_per_worker",),
    "storage_path": ("storage_path",),
    "experiment_name": ("experiment_name",),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="ARM pretraining / finetuning on Ray Train", allow_abbrev=False)
    p.add_argument("--model", help="timm name, e.g. arm_base_pz16 (picks that size's model fields)")
    for name in ("batch_size", "epochs", "accum_iter", "input_size", "seed", "num_workers"):
        p.add_argument(f"--{name}", type=str)
    for name in (
        "warmup_epochs",
        "blr",
        "lr",
        "min_lr",
        "weight_decay",
        "clip_grad",
        "layer_decay",
        "ema_decay",
        "drop_path",
        "reprob",
        "mixup",
        "cutmix",
        "smoothing",
        "cpus_per_worker",
    ):
        p.add_argument(f"--{name}", type=str)
    for name in ("data_path", "output_dir", "finetune", "storage_path", "experiment_name"):
        p.add_argument(f"--{name}", type=str)
    p.add_argument("--norm_pix_loss", action="store_true", help="accepted; the norm-pix target is always on")
    p.add_argument("--global_pool", action="store_const", const="true", help="mean-pool patch tokens (default)")
    p.add_argument("--cls_token", action="store_const", const="false", dest="global_pool", help="use the cls token")
    p.add_argument("--dist_eval", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--use_gpu", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--dry-run", "--dry_run", action="store_true", dest="dry_run", help="print the resolved config and exit"
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.blr=1e-4 cluster.num_workers=2")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse flags; unknown flags raise ValueError (argparse would exit the process)."""
    args, unknown = build_parser().parse_known_args(list(argv))
    bad = [a for a in unknown if a.startswith("-")]
    if bad:
        raise ValueError(f"unknown flag(s) {' '.join(bad)}; see --help")
    args.overrides += unknown
    return args


def model_size(argv: list[str]) -> str | None:
    """Size key named by `--model` in argv (ValueError for an unknown model), else None."""
    name = parse(argv).model
    return recipes.size_of(name) if name else None


def to_overrides(args: argparse.Namespace) -> list[str]:
    """Dotted overrides for every given flag, in flag order, then the positional ones."""
    out = []
    for flag, keys in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        value = str(value).lower() if isinstance(value, bool) else value
        out += [f"{key}={value}" for key in keys]
    for text in args.overrides:
        if "=" not in text:
            raise ValueError(f"unexpected argument {text!r}: use --flag value or key.sub=value")
    return out + list(args.overrides)


def apply_cli(cfg: TrainConfig, argv: list[str] | tuple[str, ...]) -> tuple[TrainConfig, bool]:
    """(cfg with --model, flags and dotted overrides applied, dry_run)."""
    args = parse(list(argv))
    if args.model:
        size = recipes.size_of(args.model)
        model = recipes.get(f"{cfg.task}_{size}").model
        cfg = dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, input_size=model.img_size))
    overrides = to_overrides(args)
    if args.input_size and cfg.task == "finetune" and not any(o.startswith("data.eval_resize=") for o in overrides):
        overrides.insert(0, f"data.eval_resize={recipes.eval_resize_for(int(args.input_size))}")
    return apply_overrides(cfg, overrides), args.dry_run


def print_config(cfg: TrainConfig) -> None:
    """The resolved config as JSON on stdout (the --dry-run output)."""
    sys.stdout.write(json.dumps(cfg.to_dict(), indent=2) + "\n")
