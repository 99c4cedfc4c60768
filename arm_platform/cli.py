"""Command-line flags: every official ARM `main_pretrain.py` / `main_finetune.py` flag, our Ray flags and
`key.sub=value` dotted overrides, mapped onto a TrainConfig (`config.apply_overrides`) plus a `RunIntent` (what to do
with it: train, resume, evaluate, print).

Each official flag is accepted with its official meaning or refused with a ValueError naming the Ray way
(tests/test_official_flags.py walks all 73):

    official flag                               here
    --batch_size --epochs --accum_iter --blr    optim.<same name> (batch_size is per worker = per GPU, as official)
    --lr --min_lr --warmup_epochs --clip_grad   optim.<same name>
    --weight_decay --layer_decay --ema_decay    optim.<same name>
    --drop_path / --nb_classes                  model.drop_path_rate / model.num_classes
    --input_size                                data.input_size + model.img_size (+ data.eval_resize when finetuning)
    --model                                     the size's recipe model (arm_<size>_pz16[_pretrain]); others refused
    --data_path --seed --finetune               data.data_path, seed, finetune
    --aa --reprob --smoothing                   data.auto_augment, data.reprob, data.smoothing
    --mixup --cutmix --mixup_prob               data.<same name>
    --mixup_switch_prob --mixup_mode            data.<same name>
    --global_pool [true] / --cls_token          model.global_pool true / false (`--global_pool False` is refused: the
                                                official type=bool made it True; use --cls_token)
    --dist_eval                                 data.dist_eval
    --norm_pix_loss                             accepted: the norm-pix target is always on, as in the official code
    --output_dir DIR|s3://                      storage_path: Ray storage root; runs in <DIR>/<run>/checkpoint_<step>
                                                (empty = "no saving" is refused: Ray Train always checkpoints)
    --log_dir DIR|URI                           tracking.tracking_uri: sqlite:///<abs DIR>/mlflow.db for a folder, a
                                                tracking URI (http://, sqlite://, ...) as is; s3:// refused
    --device cuda[:N] | cpu                     cluster.use_gpu true / false (Ray places the workers); others refused
    --world_size N                              cluster.num_workers N (Ray Train workers = distributed processes)
    --resume CKPT, --start_epoch N, --eval      RunIntent.resume / .start_epoch / .eval_only (launch.fit acts on them):
                                                resume a run checkpoint folder (the checkpoint's epoch wins over
                                                --start_epoch, as official misc.load_model); --eval (finetune) prints
                                                top-1/top-5 of --resume CKPT (also an official checkpoint-N.pth)
    --num_workers N                             official: DataLoader processes per GPU -> no-op with a warning: Ray
                                                Data sizes its parallel decode tasks itself (data.decode_cpus each).
                                                Ray Train workers: --world_size N or cluster.num_workers=N
    --pin_mem --no_pin_mem --dist_on_itp        no-ops with a log line: Ray Train pins batches for GPUs, sets up
    --dist_url --local_rank --local-rank        torch.distributed and assigns ranks itself
    --resplit                                   no-op: it acts on augmentation splits, which the official code lacks
    --remode pixel --recount 1                  accepted (what our random erasing does); other values refused
    --color_jitter X                            accepted as unused while --aa is set (timm skips it then, as official);
                                                refused without --aa (no color jitter here)
    --cutmix_minmax                             refused: use --cutmix ALPHA

Ray flags: --use_gpu/--no-use_gpu, --cpus_per_worker, --storage_path, --experiment_name, --dry-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from arm_platform import recipes
from arm_platform.config import TrainConfig, apply_overrides

log = logging.getLogger(__name__)

# flag -> dotted TrainConfig key(s); each takes one string value parsed by the field's type
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
    "nb_classes": ("model.num_classes",),
    "finetune": ("finetune",),
    "drop_path": ("model.drop_path_rate",),
    "aa": ("data.auto_augment",),
    "reprob": ("data.reprob",),
    "mixup": ("data.mixup",),
    "cutmix": ("data.cutmix",),
    "mixup_prob": ("data.mixup_prob",),
    "mixup_switch_prob": ("data.mixup_switch_prob",),
    "mixup_mode": ("data.mixup_mode",),
    "smoothing": ("data.smoothing",),
    "seed": ("seed",),
    "world_size": ("cluster.num_workers",),
    "cpus_per_worker": ("cluster.cpus_per_worker",),
    "storage_path": ("storage_path",),
    "experiment_name": ("experiment_name",),
}

IGNORED: dict[str, str] = {
    "num_workers": "it counted DataLoader processes; Ray Data runs decoding in parallel tasks (data.decode_cpus "
    "CPUs each). For Ray Train workers use --world_size N or cluster.num_workers=N",
    "pin_mem": "batches are pinned whenever the worker has a GPU",
    "no_pin_mem": "batches are pinned whenever the worker has a GPU",
    "dist_on_itp": "Ray Train sets up torch.distributed",
    "dist_url": "Ray Train sets up the process-group rendezvous",
    "local_rank": "Ray Train assigns the ranks",
    "resplit": "it acts on augmentation splits, which the official recipe does not use either",
}
# flag -> (the only value implemented, which is the official default; why, and what to use instead)
FIXED: dict[str, tuple[str, str]] = {
    "remode": ("pixel", "only pixel-mode random erasing is implemented; set its probability with --reprob"),
    "recount": ("1", "one random-erasing box per image is implemented; set its probability with --reprob"),
}
CHECKPOINT_FILE_SUFFIXES = (".pth", ".pt")


@dataclass(frozen=True, slots=True)
class RunIntent:
    """What the command asks launch to do with the config (not part of the config or its hash)."""

    dry_run: bool = False
    resume: str = ""
    """Official --resume: a run checkpoint folder (<output_dir>/<run>/checkpoint_<step>, local or s3://) to continue
    from; with `eval_only` also an official finetuned checkpoint-N.pth."""
    start_epoch: int = 0
    """Official --start_epoch: only with `resume`, where the checkpoint's epoch wins (official misc.load_model)."""
    eval_only: bool = False
    """Official --eval: evaluate the `resume` checkpoint on the val split, print top-1 / top-5, do not train."""


def build_parser() -> argparse.ArgumentParser:
    """All official flags, our Ray flags and positional dotted overrides (values stay strings: config parses them)."""
    p = argparse.ArgumentParser(description="ARM pretraining / finetuning on Ray Train", allow_abbrev=False)
    p.add_argument("--model", help="timm name, e.g. arm_base_pz16 (picks that size's model fields)")
    for name in FLAG_KEYS:
        p.add_argument(f"--{name}", type=str, help=f"-> {', '.join(FLAG_KEYS[name])}")
    p.add_argument("--device", help="cuda (GPU workers) or cpu -> cluster.use_gpu")
    p.add_argument("--log_dir", help="MLflow store: folder (sqlite:///DIR/mlflow.db) or tracking URI")
    p.add_argument("--global_pool", nargs="?", const="true", help="mean-pool patch tokens (default)")
    p.add_argument("--cls_token", action="store_true", help="pool with the cls token (model.global_pool=false)")
    p.add_argument("--dist_eval", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--use_gpu", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--norm_pix_loss", action="store_true", help="accepted; the norm-pix target is always on")
    p.add_argument("--resume", default="", help="run checkpoint folder to continue from (or evaluate with --eval)")
    p.add_argument("--start_epoch", default="0", help="only with --resume; the checkpoint's epoch wins")
    p.add_argument("--eval", action="store_true", dest="eval_only", help="evaluate --resume CKPT: top-1 / top-5")
    for name in ("num_workers", "dist_url"):
        p.add_argument(f"--{name}", type=str, help=f"ignored on Ray: {IGNORED[name]}")
    p.add_argument(
        "--local_rank", "--local-rank", type=str, dest="local_rank", help=f"ignored: {IGNORED['local_rank']}"
    )
    for name in ("pin_mem", "no_pin_mem", "dist_on_itp", "resplit"):
        p.add_argument(f"--{name}", action="store_true", default=None, help=f"ignored on Ray: {IGNORED[name]}")
    for name, (only, why) in FIXED.items():
        p.add_argument(f"--{name}", type=str, help=f"only {only}: {why}")
    p.add_argument("--color_jitter", type=str, help="accepted (unused) with --aa, as official; not implemented")
    p.add_argument("--cutmix_minmax", nargs="+", type=str, help="not implemented: use --cutmix ALPHA")
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
    if args.global_pool is not None and "=" in args.global_pool:  # `--global_pool key=value`: the flag had no value
        args.overrides.insert(0, args.global_pool)
        args.global_pool = "true"
    return args


def model_size(argv: list[str]) -> str | None:
    """Size key named by `--model` in argv (ValueError for an unknown model), else None."""
    name = parse(argv).model
    return recipes.size_of(name) if name else None


def _tracking_uri(log_dir: str) -> str:
    """Official --log_dir -> MLflow tracking URI: a folder holds sqlite:///<abs>/mlflow.db, a URI is used as is."""
    if log_dir.startswith("s3://"):
        raise ValueError(
            f"--log_dir {log_dir}: MLflow cannot keep its store on S3; pass a tracking server "
            "(--log_dir http://HOST:5000 or MLFLOW_TRACKING_URI); artifacts go to the server's store"
        )
    if "://" in log_dir or log_dir.startswith("databricks"):
        return log_dir
    if not log_dir:
        raise ValueError("--log_dir is empty; pass a folder or a tracking URI (default: <output_dir>/mlflow.db)")
    return f"sqlite:///{Path(log_dir).expanduser().resolve() / 'mlflow.db'}"


def _use_gpu(device: str) -> str:
    """Official --device -> cluster.use_gpu ("cuda:1" too: Ray gives each worker its own GPU)."""
    kind = device.split(":", 1)[0].lower()
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"--device {device!r}: Ray Train workers run on cuda or cpu; pass --device cuda or cpu")
    return "true" if kind == "cuda" else "false"


def _global_pool(value: str) -> str:
    if value.lower() in ("true", "1", "yes", "avg"):
        return "true"
    raise ValueError(
        f"--global_pool {value}: the official flag is type=bool, so any value (even False) meant True; "
        "for mean pooling pass --global_pool, for the cls token --cls_token"
    )


def _translated(args: argparse.Namespace) -> list[str]:
    """Dotted overrides of the flags that are not one-to-one (device, log_dir, pooling, boolean actions)."""
    out = []
    if args.device is not None:
        out.append(f"cluster.use_gpu={_use_gpu(args.device)}")
    if args.log_dir is not None:
        out.append(f"tracking.tracking_uri={_tracking_uri(args.log_dir)}")
    if args.global_pool is not None and args.cls_token:
        raise ValueError("--global_pool and --cls_token contradict each other; pass one of them")
    if args.global_pool is not None or args.cls_token:
        out.append(f"model.global_pool={'false' if args.cls_token else _global_pool(args.global_pool)}")
    for flag, key in (("dist_eval", "data.dist_eval"), ("use_gpu", "cluster.use_gpu")):
        if getattr(args, flag) is not None:
            out.append(f"{key}={str(getattr(args, flag)).lower()}")
    return out


def to_overrides(args: argparse.Namespace) -> list[str]:
    """Dotted overrides for every given config flag, in flag order, then the positional ones."""
    if args.output_dir == "":
        raise ValueError(
            "--output_dir '' (official: no saving): Ray Train always checkpoints; pass a folder or s3:// URI"
        )
    out = []
    for flag, keys in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            out += [f"{key}={value}" for key in keys]
    out += _translated(args)
    for text in args.overrides:
        if "=" not in text:
            raise ValueError(f"unexpected argument {text!r}: use --flag value or key.sub=value")
    return out + list(args.overrides)


def _same(value: str, expected: str) -> bool:
    """String equality that also holds for equal numbers ("1.0" == "1")."""
    try:
        return float(value) == float(expected)
    except ValueError:
        return value.lower() == expected.lower()


def _check_unsupported(args: argparse.Namespace, cfg: TrainConfig) -> None:
    """Refuse values of official flags this pipeline does not implement; log the flags that are no-ops on Ray."""
    for flag, (only, why) in FIXED.items():
        value = getattr(args, flag)
        if value is not None and not _same(value, only):
            raise ValueError(f"--{flag} {value}: {why} (--{flag} {only} is accepted)")
    if args.cutmix_minmax is not None:
        raise ValueError(
            "--cutmix_minmax is not implemented: CutMix box sizes come from Beta(alpha); use --cutmix ALPHA"
        )
    if args.color_jitter is not None and args.color_jitter.lower() != "none":
        if not cfg.data.auto_augment:
            raise ValueError(
                "--color_jitter: color jitter is not implemented; use --aa rand-m9-mstd0.5-inc1 (RandAugment), "
                "with which the official transform ignores --color_jitter anyway"
            )
        log.info("--color_jitter unused while --aa %s is set (as in the official transform)", cfg.data.auto_augment)
    for flag, reason in IGNORED.items():
        if getattr(args, flag) is not None:
            (log.warning if flag == "num_workers" else log.info)("--%s ignored on Ray: %s", flag, reason)


def _intent(args: argparse.Namespace, cfg: TrainConfig) -> RunIntent:
    """RunIntent of --resume / --start_epoch / --eval / --dry-run; ValueError for combinations Ray cannot honour."""
    try:
        start_epoch = int(args.start_epoch)
    except ValueError:
        raise ValueError(f"--start_epoch {args.start_epoch!r}: expected an integer") from None
    resume = args.resume
    if start_epoch and not resume:
        raise ValueError(
            f"--start_epoch {start_epoch} without --resume: a Ray run starts at epoch 0 or continues from a "
            "checkpoint; pass --resume <output_dir>/<run>/checkpoint_<step> (or re-run the same --experiment_name)"
        )
    if args.eval_only and cfg.task != "finetune":
        raise ValueError("--eval evaluates a classifier (main_finetune.py); pretraining reports knn_acc1 instead")
    if args.eval_only and not resume:
        raise ValueError("--eval evaluates the checkpoint given by --resume CKPT (run checkpoint folder or .pth)")
    if resume.endswith(CHECKPOINT_FILE_SUFFIXES) and not args.eval_only:
        raise ValueError(
            f"--resume {resume}: a single-file checkpoint cannot restore a Ray run (optimizer, schedule, data "
            "order); continue a run from <output_dir>/<run>/checkpoint_<step>, or start from its weights with "
            "--finetune (finetuning) / --eval --resume (evaluation)"
        )
    return RunIntent(dry_run=args.dry_run, resume=resume, start_epoch=start_epoch, eval_only=args.eval_only)


def _with_model(cfg: TrainConfig, name: str | None) -> TrainConfig:
    """cfg with the model of `name`'s size from the same-task recipe (input size follows)."""
    if not name:
        return cfg
    model = recipes.get(f"{cfg.task}_{recipes.size_of(name)}").model
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, input_size=model.img_size))


def resolve(cfg: TrainConfig, argv: list[str] | tuple[str, ...]) -> tuple[TrainConfig, RunIntent]:
    """(cfg with --model, official / Ray flags and dotted overrides applied, what to do with it)."""
    args = parse(list(argv))
    cfg = _with_model(cfg, args.model)
    overrides = to_overrides(args)
    cfg = apply_overrides(cfg, overrides)
    _check_unsupported(args, cfg)
    return cfg, _intent(args, cfg)


def apply_cli(cfg: TrainConfig, argv: list[str] | tuple[str, ...]) -> tuple[TrainConfig, bool]:
    """(cfg, dry_run) for callers that only train from scratch (sweeps): --resume / --eval are refused here."""
    cfg, intent = resolve(cfg, argv)
    if intent.resume or intent.eval_only:
        raise ValueError(
            "--resume / --eval act on one run: use jobs/pretrain.py or jobs/finetune.py (launch.fit); "
            "sweep trials start from --finetune weights"
        )
    return cfg, intent.dry_run


def print_config(cfg: TrainConfig) -> None:
    """The resolved config as JSON on stdout (the --dry-run output), credentials masked."""
    from arm_platform.security import redact

    sys.stdout.write(json.dumps(redact(cfg.to_dict()), indent=2) + "\n")
