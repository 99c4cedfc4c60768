"""Typed configuration schema for ARM pretraining / finetuning runs.

Only types, validation and derived quantities live here; every number lives in `recipes.py`.
Configs round-trip through plain dicts (`to_dict` / `from_dict`) because Ray, Tune and MLflow pass dicts,
and accept run-specific overrides (`apply_overrides(cfg, ["optim.blr=1e-4"])`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from arm_platform.security import validate_name

TASKS = ("pretrain", "finetune")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Backbone / head geometry. Field names follow timm (backbone) and mamba (mixer)."""

    name: str
    """timm registry name of the finetune classifier, e.g. "arm_base_pz16"; the pretrain model is name + "_pretrain"."""
    embed_dim: int
    depth: int
    img_size: int = 192
    patch_size: int = 16
    in_chans: int = 3
    target_chans: int | None = None
    """Pretraining: input channels the norm-pix target covers (the first target_chans); None: all in_chans. The tiny
    recipe uses 1: its Fashion-MNIST images are gray stored as RGB, and three normalised copies of one gray value
    would make the model predict a fixed channel pattern (a constant predictor's loss 0.66 instead of 0.73)."""
    cluster_size: int = 4
    """Patches per cluster side; ARM predicts one cluster of cluster_size**2 patches per autoregressive step."""
    d_state: int = 16
    d_conv: int = 4
    expand: int = 1
    decoder_dim: int = 512
    decoder_depth: int = 4
    decoder_head_dim: int = 64
    num_classes: int = 1000
    drop_path_rate: float = 0.0
    global_pool: bool = True
    """Finetune pooling: mean of patch tokens (True, official README) or the middle cls token (False)."""
    grad_checkpointing: bool = False
    """Activation checkpointing of encoder blocks (trades compute for memory, used by the huge recipe)."""

    def __post_init__(self) -> None:
        _require(self.embed_dim > 0 and self.depth > 0, f"embed_dim and depth must be positive, got {self}")
        _require(
            self.img_size % self.patch_size == 0,
            f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}",
        )
        _require(
            self.decoder_dim % self.decoder_head_dim == 0,
            f"decoder_dim {self.decoder_dim} is not divisible by decoder_head_dim {self.decoder_head_dim}",
        )
        _require(
            self.target_chans is None or 1 <= self.target_chans <= self.in_chans,
            f"target_chans must be in [1, in_chans={self.in_chans}], got {self.target_chans}",
        )
        _require(0.0 <= self.drop_path_rate < 1.0, f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        """Pixel values per patch (the regression target width)."""
        return self.patch_size**2 * self.in_chans

    @property
    def target_dim(self) -> int:
        """Values per predicted patch (the decoder's output width): patch_size**2 * target channels."""
        return self.patch_size**2 * (self.target_chans or self.in_chans)

    @property
    def cluster_grid(self) -> int:
        """Clusters per image side."""
        return self.grid_size // self.cluster_size

    @property
    def num_clusters(self) -> int:
        return self.cluster_grid**2

    @property
    def patches_per_cluster(self) -> int:
        return self.cluster_size**2

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.embed_dim / 16)

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def swiglu_hidden(self) -> int:
        """Official SwiGLU width: d * 4 * 2 // 3."""
        return self.embed_dim * 4 * 2 // 3

    @property
    def tap_layers(self) -> tuple[int, ...]:
        """1-indexed encoder blocks whose outputs feed the decoder: {6,8,10,12} at depth 12, {12,16,20,24} at 24."""
        return tuple(max(1, round(self.depth * (3 + i) / 6)) for i in range(4))

    def validate_for_pretraining(self) -> None:
        """Raise ValueError unless the patch grid splits into at least two whole clusters."""
        _require(
            self.grid_size % self.cluster_size == 0,
            f"grid {self.grid_size}x{self.grid_size} (img_size {self.img_size} / patch_size {self.patch_size}) "
            f"is not divisible by cluster_size {self.cluster_size}",
        )
        _require(self.num_clusters >= 2, f"pretraining needs >= 2 clusters, got {self.num_clusters}")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where shards live and how images are augmented (official flag names where they exist)."""

    data_path: str = ""
    """Folder or s3://bucket/prefix written by `jobs/prepare_data.py` (manifest.json + <split>/*.parquet)."""
    train_split: str = "train"
    val_split: str = "val"
    probe_split: str | None = None
    """Labelled bank of the pretraining probes (kNN, linear probe): a split read whole, e.g. the demo's "labelled".
    None: the first `max_val_samples` images of `train_split`."""
    input_size: int = 192
    min_crop_scale: float = 0.2
    """RandomResizedCrop lower scale: 0.2 for pretraining, 0.08 for finetuning (timm default)."""
    hflip: float = 0.5
    interpolation: str = "bicubic"
    auto_augment: str | None = None
    """timm RandAugment spec for finetuning, e.g. "rand-m9-mstd0.5-inc1"."""
    reprob: float = 0.0
    eval_resize: int | None = None
    """Eval resize (both sides, as the official finetune code) before the center crop of input_size. None (every
    recipe): derived from input_size by `recipes.eval_resize_for` (224 -> 256, 192 -> 219, 32 -> 37), so an
    input_size override moves it too; read the value in use from `effective_eval_resize`."""
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    max_train_samples: int | None = None
    """Cap on training images (tiny demo runs / tests); None uses the whole split."""
    max_val_samples: int | None = None
    train_repeats: int = 1
    """Passes over the train images per epoch (small labelled sets: an epoch of 1,000 images is mostly the pipeline's
    start and the epoch-end checkpoint; 3 passes per epoch pay them once)."""
    decode_cpus: float = 1.0
    """CPUs reserved per Ray Data decode/augment task (fractional on small machines)."""
    decode_batch_size: int = 256
    """Rows per Ray Data read block and decode/augment task (smaller: more parallel tasks, more overhead)."""
    io_retries: int = 3
    """Attempts for storage checks / reads (missing shard, unreachable bucket) before a clear error."""
    verify_checksums: bool | None = None
    """Pre-flight check: also compare every shard's sha256 with the manifest (size and Parquet footer are always
    checked). None: only when the checked shards total at most 1 GiB (`manifest.VERIFY_AUTO_MAX_BYTES`), so demo
    and small sets are hashed and huge remote sets are not; True / False force it."""
    stall_warn_s: float = 60.0
    """Training: log a warning naming the data source each time no batch has arrived for this many seconds."""
    stall_timeout_s: float = 1800.0
    """Training: fail with a clear error when no batch has arrived for this long (0 waits forever)."""
    shard_size_mb: float = 256.0
    """Ingest (`jobs/prepare_data.py`): target Parquet shard size."""
    num_parallel: int | None = None
    """Ingest processes; None uses every CPU."""
    jpeg_quality: int = 95
    """Ingest: JPEG quality when an image must be re-encoded (non-JPEG / non-RGB sources, Fashion-MNIST)."""
    dist_eval: bool = True
    """Split the val set across workers and all-reduce the counts (official --dist_eval, used by the README)."""

    def __post_init__(self) -> None:
        _require(0.0 < self.min_crop_scale <= 1.0, f"min_crop_scale must be in (0, 1], got {self.min_crop_scale}")
        _require(0.0 <= self.reprob <= 1.0, f"reprob must be in [0, 1], got {self.reprob}")
        _require(
            self.eval_resize is None or self.eval_resize >= self.input_size,
            f"eval_resize {self.eval_resize} must be >= input_size {self.input_size}",
        )
        _require(self.mixup >= 0 and self.cutmix >= 0, "mixup / cutmix alphas must be >= 0")
        _require(self.train_repeats >= 1, f"train_repeats must be >= 1, got {self.train_repeats}")
        _require(self.stall_warn_s > 0, f"stall_warn_s must be > 0, got {self.stall_warn_s}")
        _require(self.stall_timeout_s >= 0, f"stall_timeout_s must be >= 0, got {self.stall_timeout_s}")

    @property
    def uses_mixup(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @property
    def effective_eval_resize(self) -> int:
        """Eval resize in use: `eval_resize` when set, else the official rule of `recipes.eval_resize_for`."""
        if self.eval_resize is not None:
            return self.eval_resize
        from arm_platform.recipes import eval_resize_for  # the one rule; recipes imports this module

        return eval_resize_for(self.input_size)


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW, per-iteration warmup + half-cosine schedule, MAE lr scaling rule."""

    batch_size: int
    """Images per worker per forward pass (official --batch_size is per GPU)."""
    epochs: int
    blr: float
    """Base learning rate: lr = blr * effective batch / 256 (MAE rule)."""
    lr: float | None = None
    """Absolute learning rate; overrides blr when set."""
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad: float | None = None
    accum_iter: int = 1
    layer_decay: float | None = None
    """Layer-wise lr decay (finetuning); None disables it."""
    ema_decay: float | None = None
    """Model EMA decay (finetuning); None disables the EMA."""

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        _require(self.epochs > 0, f"epochs must be positive, got {self.epochs}")
        _require(self.accum_iter >= 1, f"accum_iter must be >= 1, got {self.accum_iter}")
        _require(
            0 <= self.warmup_epochs <= self.epochs,
            f"warmup_epochs {self.warmup_epochs} must be in [0, epochs={self.epochs}]",
        )
        _require(self.blr > 0 or (self.lr or 0) > 0, "one of blr / lr must be positive")
        _require(self.layer_decay is None or 0 < self.layer_decay <= 1, "layer_decay must be in (0, 1]")
        _require(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay must be in (0, 1)")
        self.betas = tuple(self.betas)

    def effective_batch(self, num_workers: int) -> int:
        """Images per optimizer step across all workers."""
        return self.batch_size * self.accum_iter * num_workers

    def effective_lr(self, num_workers: int) -> float:
        """Peak learning rate: `lr` if given, else blr * effective batch / 256."""
        if self.lr is not None:
            return self.lr
        return self.blr * self.effective_batch(num_workers) / 256


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    """Shape of the Ray Train worker group (never called ScalingConfig, to not shadow Ray's)."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    """Fractional values let workers and Ray Data decode tasks share a small machine without deadlock."""
    gpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, f"num_workers must be >= 1, got {self.num_workers}")
        _require(self.cpus_per_worker > 0, f"cpus_per_worker must be positive, got {self.cpus_per_worker}")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    every_n_steps: int = 0
    """Also checkpoint every N optimizer steps (0: only at epoch ends)."""
    num_to_keep: int | None = 3
    score_attribute: str | None = None
    """Metric ranking checkpoints for keep-top-K (None: keep the most recent)."""
    score_order: Literal["max", "min"] = "max"
    max_failures: int = 3
    """Worker-group restarts (Ray FailureConfig) before the run fails."""

    def __post_init__(self) -> None:
        _require(self.every_n_steps >= 0, "every_n_steps must be >= 0")
        _require(self.num_to_keep is None or self.num_to_keep >= 1, "num_to_keep must be >= 1 or None")
        _require(self.score_order in ("max", "min"), f"score_order must be max or min, got {self.score_order}")


@dataclass(kw_only=True, slots=True)
class TrackingConfig:
    tracking_uri: str | None = None
    """MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite:///<storage_path>/mlflow.db."""
    experiment_name: str | None = None
    """MLflow experiment; None: the recipe name."""
    log_every_n_steps: int = 20
    vis_every_n_epochs: int = 1
    """Pretraining: log a predicted-vs-true next-cluster image grid every N epochs (0 disables)."""
    probe_every_n_epochs: int = 1
    """Pretraining: kNN + linear-probe accuracy on held-out labelled images every N epochs (0 disables)."""
    system_metrics: bool = True
    knn_k: int = 20
    """kNN probe: neighbours voting per query (DINO weighted kNN)."""
    knn_temperature: float = 0.07
    """kNN probe: softmax temperature of the cosine-similarity vote weights."""
    linear_probe_l2: float = 1e-3
    """Linear probe: L2 penalty (l2 / 2 * |W|^2 on the mean cross-entropy; sklearn's C=1 at 1,000 images)."""
    linear_probe_max_iter: int = 100
    """Linear probe: full-batch L-BFGS iterations (strong-Wolfe line search) of the logistic regression."""
    random_init_baseline: bool = True
    """Pretraining: at the first probe, also probe this run's own random-init encoder and log the constant-predictor
    loss (metrics *_random_init, loss_constant_baseline); warn whenever the trained probe does not beat it."""

    def __post_init__(self) -> None:
        _require(self.linear_probe_l2 >= 0, f"linear_probe_l2 must be >= 0, got {self.linear_probe_l2}")
        _require(self.linear_probe_max_iter >= 1, f"linear_probe_max_iter must be >= 1: {self.linear_probe_max_iter}")
        if self.experiment_name is not None:  # an MLflow name, never a storage path: "/Users/me/x" is allowed
            validate_name(self.experiment_name, "tracking.experiment_name", allow_slash=True)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """One training run: a recipe plus run-specific overrides."""

    recipe: str
    task: Literal["pretrain", "finetune"]
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage_path: str = "./runs"
    """Ray Train storage: local folder or s3://bucket/prefix (official --output_dir)."""
    experiment_name: str | None = None
    """Ray run name; re-running the same name resumes it. None: derived from the recipe and its config."""
    finetune: str = ""
    """Finetuning: pretrain checkpoint to start from (path, s3:// URI or official checkpoint-*.pth)."""
    head_init: Literal["random", "probe"] = "random"
    """Finetuning: the classifier head starts as the official trunc_normal(.02) init ("random"), or as a linear probe
    of the starting encoder's frozen features, fitted on the train split's images with the eval transform ("probe":
    linear-probe-then-finetune, LP-FT; keeps pretrained features at small label counts)."""
    seed: int = 0
    precision: Literal["bf16", "fp32"] = "bf16"
    """Autocast dtype on GPU (CPU always runs fp32)."""
    eval_every_n_epochs: int = 1

    def __post_init__(self) -> None:
        _require(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        _require(self.precision in ("bf16", "fp32"), f"precision must be bf16 or fp32, got {self.precision!r}")
        _require(self.head_init in ("random", "probe"), f"head_init must be random or probe, got {self.head_init!r}")
        if self.experiment_name is not None:  # the run folder <storage_path>/<experiment_name>
            validate_name(self.experiment_name, "experiment_name")
        _require(
            self.data.input_size == self.model.img_size,
            f"data.input_size {self.data.input_size} != model.img_size {self.model.img_size} "
            "(set both, e.g. with --input_size)",
        )
        if self.task == "pretrain":
            self.model.validate_for_pretraining()

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, data)


# --------------------------------------------------------------------------------------------------------------------
# dict round trip and overrides

C = TypeVar("C")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists, so the result is JSON / MLflow friendly)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Inverse of `to_dict`; unknown keys raise ValueError naming the closest valid key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ValueError(_unknown_key_message(cls.__name__, key, names))
        kwargs[key] = _coerce(hints[key], value, key)
    return cls(**kwargs)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flat {"optim.blr": 1.5e-4, ...} view (MLflow params, Tune search spaces)."""
    flat: dict[str, Any] = {}
    for key, value in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def apply_overrides(cfg: C, overrides: list[str] | dict[str, Any]) -> C:
    """Return a validated copy of `cfg` with dotted-key overrides applied.

    Args:
        overrides: ["optim.blr=1e-4", "cluster.num_workers=2"] or {"optim.blr": 1e-4}; string values are parsed by
            the field's type ("none" / "null" set an optional field to None).
    """
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    data = to_dict(cfg)
    for dotted, value in items:
        _set_dotted(type(cfg), data, dotted, value)
    return from_dict(type(cfg), data)


def _split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value (e.g. optim.blr=1e-4)")
    key, value = text.split("=", 1)
    return key.strip().lstrip("-"), value.strip()


def _set_dotted(cls: type, data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise ValueError(_unknown_key_message(cls.__name__, dotted, names))
        cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"override {dotted!r}: {part!r} is not a config section")
        data = data[part]
    hints = typing.get_type_hints(cls)
    if leaf not in hints:
        raise ValueError(_unknown_key_message(cls.__name__, dotted, list(hints)))
    if dataclasses.is_dataclass(hints[leaf]):
        raise ValueError(f"override {dotted!r} names a section; set one of its fields, e.g. {dotted}.<field>=...")
    data[leaf] = _parse(hints[leaf], value, dotted) if isinstance(value, str) else value


def _unknown_key_message(section: str, key: str, valid: list[str]) -> str:
    leaf = key.split(".")[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
    return f"unknown config key {key!r} in {section}{hint}"


def _optional_inner(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `X | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in typing.get_args(tp)
    return tp, False


def _parse(tp: Any, text: str, key: str) -> Any:
    """Parse an override string by the field's type."""
    inner, optional = _optional_inner(tp)
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if inner is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if typing.get_origin(inner) is tuple:
            return tuple(float(v) for v in text.strip("()[]").split(","))
        if inner in (int, float, str):
            return inner(float(text)) if inner is int and "e" in text.lower() else inner(text)
        if typing.get_origin(inner) is Literal:
            return text
    except ValueError as err:
        raise ValueError(f"override {key}={text!r}: expected {tp}") from err
    return text


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Turn dict values back into field types (nested dataclasses, tuples)."""
    inner, _ = _optional_inner(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(inner) and isinstance(value, dict):
        return from_dict(inner, value)
    if typing.get_origin(inner) is tuple:
        return tuple(value)
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value
