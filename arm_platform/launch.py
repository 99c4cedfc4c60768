"""Launch ARM training on Ray Train: validate everything, then build and fit a TorchTrainer.

`fit(cfg, overrides)` parses official flags / dotted overrides (`cli.py`), checks the model, data, batch geometry and
finetune checkpoint BEFORE Ray starts (ValueError naming the problem), derives a deterministic run name
(`<recipe>-<config hash>` unless `experiment_name` is set), joins or starts Ray and fits. Re-running the same
experiment resumes from its latest checkpoint (Ray Train V2 restores the run's checkpoint manager from storage);
re-running a finished one returns its stored Result without starting Ray; a different config under an existing
run name raises ValueError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arm_platform import cli, recipes, storage
from arm_platform.config import TrainConfig
from arm_platform.data.manifest import Manifest, check_data_path
from arm_platform.security import install_log_redaction, redact, redact_text

log = logging.getLogger(__name__)

RUN_FILE = "arm_run.json"
"""Per-run record in the run folder: config hash, final step, finished flag."""
_HASH_EXCLUDE = (
    "storage_path",
    "experiment_name",
    "tracking",
    "checkpoint.max_failures",
    "cluster.cpus_per_worker",
    "data.decode_cpus",
    "data.stall_warn_s",
    "data.stall_timeout_s",
    "data.verify_checksums",
)


@dataclass(frozen=True, slots=True)
class Plan:
    """What `validate` derived from a config: geometry, names and where the run lives."""

    cfg: TrainConfig
    manifest: Manifest
    steps_per_epoch: int
    total_steps: int
    config_hash: str
    run_name: str
    storage_path: str
    """Absolute local path or s3:// URI."""

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage_path, self.run_name)


# ------------------------------------------------------------------------------------------------ validation
def config_hash(cfg: TrainConfig) -> str:
    """Short stable hash of what determines the training trajectory (not where it is stored or tracked)."""
    data = TrainConfig.from_dict(cfg.to_dict()).to_dict()  # canonical types (1 vs 1.0 for float fields)
    data["data"]["eval_resize"] = cfg.data.effective_eval_resize  # derived (None) and the explicit rule value alike
    for key in _HASH_EXCLUDE:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


def steps_per_epoch(num_images: int, cfg: TrainConfig) -> int:
    """Optimizer steps per epoch: each of W workers gets floor(N / W) rows, drop_last batches, accum micro-batches."""
    per_worker = num_images // cfg.cluster.num_workers
    return (per_worker // cfg.optim.batch_size) // cfg.optim.accum_iter


def validate(cfg: TrainConfig) -> Plan:
    """Every check that can fail before Ray starts; ValueError naming the problem."""
    recipes.size_of(cfg.model.name)
    try:
        manifest = check_data_path(cfg.data)
    except (FileNotFoundError, ConnectionError, OSError) as err:
        raise ValueError(f"data path {cfg.data.data_path!r} is not usable: {err}") from err
    if manifest.num_classes != cfg.model.num_classes:
        raise ValueError(
            f"data path {cfg.data.data_path} has {manifest.num_classes} classes but model.num_classes is "
            f"{cfg.model.num_classes}; pass model.num_classes={manifest.num_classes}"
        )
    num_train = manifest.counts[cfg.data.train_split]
    if cfg.data.max_train_samples is not None:
        num_train = min(num_train, cfg.data.max_train_samples)
    num_train *= cfg.data.train_repeats
    spe = steps_per_epoch(num_train, cfg)
    if spe < 1:
        raise ValueError(
            f"batch not divisible: {num_train} training images cannot fill one global batch of "
            f"{cfg.optim.effective_batch(cfg.cluster.num_workers)} (batch_size {cfg.optim.batch_size} x "
            f"accum_iter {cfg.optim.accum_iter} x num_workers {cfg.cluster.num_workers})"
        )
    if cfg.data.uses_mixup and cfg.optim.batch_size % 2:
        raise ValueError(f"batch_size {cfg.optim.batch_size} must be even for Mixup/CutMix")
    if cfg.task == "finetune" and cfg.finetune:
        from arm_platform.train.checkpoint import pretrained_source

        cfg = dataclasses.replace(cfg, finetune=absolute(cfg.finetune))  # workers run in other folders
        pretrained_source(cfg.finetune)
    run_hash = config_hash(cfg)
    root = absolute(cfg.storage_path)
    return Plan(
        cfg=cfg,
        manifest=manifest,
        steps_per_epoch=spe,
        total_steps=spe * cfg.optim.epochs,
        config_hash=run_hash,
        run_name=cfg.experiment_name or f"{cfg.recipe}-{run_hash}",
        storage_path=root,
    )


def absolute(uri: str) -> str:
    """A local path made absolute (Ray workers and Tune trials run in other working folders); URIs unchanged."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def read_run_record(plan: Plan) -> dict[str, Any] | None:
    uri = storage.join(plan.run_uri, RUN_FILE)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def check_run_folder(plan: Plan) -> dict[str, Any] | None:
    """The existing run record; ValueError when the run name holds a different config (never overwrite it)."""
    record = read_run_record(plan)
    if record is not None and record["config_hash"] != plan.config_hash:
        raise ValueError(
            f"run {plan.run_uri} already holds a different config (hash {record['config_hash']} != "
            f"{plan.config_hash}); pick another experiment_name or storage_path"
        )
    return record


def write_run_record(plan: Plan, finished: bool) -> None:
    record = {
        "config_hash": plan.config_hash,
        "total_steps": plan.total_steps,
        "finished": finished,
        "recipe": plan.cfg.recipe,
        "config": redact(plan.cfg.to_dict()),
    }
    storage.write_bytes_atomic(storage.join(plan.run_uri, RUN_FILE), json.dumps(record, indent=2).encode())


# ------------------------------------------------------------------------------------------------ Ray
def loop_config(plan: Plan, tracking_uri: str | None) -> dict[str, Any]:
    """The dict `train.loop.train_loop_per_worker` receives."""
    from arm_platform.tracking import default_artifact_location
    from arm_platform.train.loop import FAULT_ENV, HOLD_ENV

    local_artifacts = default_artifact_location(plan.storage_path)
    return {
        "cfg": plan.cfg.to_dict(),
        "run_name": plan.run_name,
        "run_uri": plan.run_uri,
        "steps_per_epoch": plan.steps_per_epoch,
        "tracking_uri": tracking_uri,
        "artifact_location": local_artifacts if tracking_uri and tracking_uri.startswith("sqlite:") else None,
        "fault": os.environ.get(FAULT_ENV),
        "hold": os.environ.get(HOLD_ENV),
    }


def init_ray() -> None:
    """Join the cluster (RAY_ADDRESS / `ray job submit`) or start a local one, unless already connected."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto")
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init()


def build_trainer(  # noqa: ANN201 (ray type)
    plan: Plan,
    tracking_uri: str | None,
    name: str | None = None,
    callbacks: list | None = None,
    resume_from: str = "",
):
    """TorchTrainer for a validated plan (also used by `tune`, with a trial-specific `name` and Tune callbacks).

    `resume_from`: official --resume, a checkpoint folder the run starts from while it has no checkpoint of its own.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from arm_platform.data.datasets import build_datasets
    from arm_platform.train.loop import train_loop_per_worker

    cfg = plan.cfg
    resources = {"CPU": cfg.cluster.cpus_per_worker} | (
        {"GPU": cfg.cluster.gpus_per_worker} if cfg.cluster.use_gpu else {}
    )
    scaling = ray.train.ScalingConfig(
        num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu, resources_per_worker=resources
    )
    fs, path = (
        storage.filesystem_for(plan.storage_path) if storage.is_s3(plan.storage_path) else (None, plan.storage_path)
    )
    ckpt = cfg.checkpoint
    run_config = ray.train.RunConfig(
        name=name or plan.run_name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=ckpt.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=ckpt.num_to_keep,
            checkpoint_score_attribute=ckpt.score_attribute,
            checkpoint_score_order=ckpt.score_order,
        ),
        callbacks=callbacks,
    )
    datasets = build_datasets(cfg.data, cfg.task, plan.manifest, probe=cfg.head_init == "probe")
    split = ["train"] + (
        ["val"] if cfg.task == "finetune" and cfg.data.dist_eval and cfg.cluster.num_workers > 1 else []
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(plan, tracking_uri) | {"resume_from": resume_from},
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=split),
    )


def prepare(cfg: TrainConfig, overrides: list[str] | tuple[str, ...] = ()) -> tuple[TrainConfig, cli.RunIntent]:
    """Apply CLI flags / overrides; (cfg, what the command asks: dry run, official --resume / --eval)."""
    return cli.resolve(cfg, list(overrides))


def check_resume(path: str) -> str:
    """Official --resume: `path` when it is a verified run checkpoint folder (local or s3://), else ValueError."""
    if not path:
        return ""
    from arm_platform.train.integrity import CheckpointError, verify_checkpoint

    try:
        verify_checkpoint(path, deep=False)
    except CheckpointError as err:
        raise ValueError(
            f"--resume {path}: not a usable run checkpoint ({err}); pass <output_dir>/<run>/checkpoint_<step>"
        ) from err
    return path


def fit(cfg: TrainConfig, overrides: list[str] | tuple[str, ...] = ()):  # noqa: ANN201 (ray.train.Result)
    """Validate, then train on Ray Train; returns the ray.train.Result (None for --dry-run).

    Before Ray starts: checkpoints of an existing run that do not verify are quarantined (`integrity.repair_run`), so
    the run resumes from its newest verified checkpoint. A finished run (record says finished, same config, final
    checkpoint intact) returns its stored Result without starting Ray.
    """

    from arm_platform.tracking import default_tracking_uri
    from arm_platform.train.integrity import repair_run

    install_log_redaction()
    cfg, intent = prepare(cfg, overrides)
    if intent.dry_run:
        cli.print_config(cfg)
        return None
    if intent.eval_only:
        from arm_platform.evaluate import evaluate_checkpoint

        return evaluate_checkpoint(cfg, intent.resume)
    plan = validate(cfg)
    resume_from = check_resume(absolute(intent.resume) if intent.resume else "")
    if intent.start_epoch:
        log.info("--start_epoch %d: the epoch stored in %s wins (as official)", intent.start_epoch, resume_from)
    tracking_uri = cfg.tracking.tracking_uri or default_tracking_uri(plan.storage_path)
    record = check_run_folder(plan)
    skipped = repair_run(plan.run_uri) if record is not None else []
    if record is not None and record.get("finished") and not skipped:
        log.info("run %s already finished at step %d; returning its result", plan.run_uri, record["total_steps"])
        return stored_result(plan.run_uri)
    write_run_record(plan, finished=False)
    log.info(
        "run %s: %d steps/epoch x %d epochs, lr %.3e, tracking %s",
        plan.run_uri,
        plan.steps_per_epoch,
        cfg.optim.epochs,
        cfg.optim.effective_lr(cfg.cluster.num_workers),
        redact_text(tracking_uri),
    )
    init_ray()
    result = build_trainer(plan, tracking_uri, resume_from=resume_from).fit()
    if result.metrics and result.metrics.get("step") == plan.total_steps:
        write_run_record(plan, finished=True)
    sync_checkpoint_tags(plan.run_uri, plan.run_name, tracking_uri)
    return result


def stored_result(run_uri: str):  # noqa: ANN201 (ray.train.Result)
    """The Result of a run folder (local path or s3:// URI) from Ray's run snapshot."""
    import ray.train

    fs, path = storage.filesystem_for(run_uri)
    return ray.train.Result.from_path(path, storage_filesystem=fs)


def sync_checkpoint_tags(run_uri: str, run_name: str, tracking_uri: str) -> None:
    """After a fit: delete the MLflow `checkpoint.step_*` tags of checkpoints Ray pruned (num_to_keep)."""
    import mlflow

    from arm_platform.tracking import prune_checkpoint_tags, run_id_for
    from arm_platform.train.integrity import list_checkpoints

    client = mlflow.MlflowClient(tracking_uri)
    run_id = run_id_for(client, run_name)
    if run_id is not None:
        prune_checkpoint_tags(client, run_id, {found.uri for found in list_checkpoints(run_uri)})


def recipe_for(task: str, argv: list[str] | tuple[str, ...], default_size: str = "base") -> TrainConfig:
    """Recipe `<task>_<size>` with the size taken from `--model` in argv (e.g. arm_tiny_pz4 -> tiny)."""
    return recipes.get(f"{task}_{cli.model_size(list(argv)) or default_size}")
