"""Ray Tune sweeps over finetuning hyperparameters, one Ray Train V2 `TorchTrainer` per trial.

Follows Ray's `doc/source/train/doc_code/train_tune_interop.py`: a per-trial `train_driver_fn(config)` builds the
TrainConfig from the base recipe plus the trial's sampled dotted overrides and fits a TorchTrainer named
`train-trial_id=<trial id>` (no timestamps: a restarted trial re-attaches to its Train run) with `TuneReportCallback`.
ASHA stops weak trials on `val_acc1`; Optuna optionally proposes them. Every trial is an MLflow run nested under the
sweep's parent run (tag `mlflow.parentRunId`). Re-running the same sweep name resumes it (`Tuner.restore`).
Search spaces are data in `recipes.SEARCH_SPACES`: {"optim.blr": ("loguniform", 1e-4, 2e-3), ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from arm_platform import cli, launch, recipes, registry, storage
from arm_platform.config import TrainConfig, apply_overrides, flatten
from arm_platform.search_space import build_param_space, parse_space_args
from arm_platform.tracking import RUN_NAME_TAG, default_tracking_uri, safe_params

logger = logging.getLogger(__name__)

METRIC, MODE = "val_acc1", "max"
TRIAL_DRIVER_CPUS = 0.1
"""CPU reserved by each trial's driver process (it only waits on its TorchTrainer)."""
SWEEP_TAG, TRIAL_TAG = "arm.sweep_name", "arm.trial_id"
CHECKPOINT_PATH_KEY = "checkpoint_path"
"""Metric key TuneReportCallback adds with the storage path of the reported checkpoint."""


# --------------------------------------------------------------------------------------------------------------------
# resources


def trial_resources(cfg: TrainConfig) -> dict[str, float]:
    """Cluster resources one trial needs at once: its driver, its Train workers and one Ray Data task.

    Ray Data read and decode tasks each reserve `data.decode_cpus`; a trial whose workers leave less than that free
    deadlocks, so it counts as needed.
    """
    c = cfg.cluster
    need = {"CPU": TRIAL_DRIVER_CPUS + c.num_workers * c.cpus_per_worker + cfg.data.decode_cpus}
    if c.use_gpu:
        need["GPU"] = c.num_workers * c.gpus_per_worker
    return need


def max_concurrent_trials(need: Mapping[str, float], available: Mapping[str, float]) -> int:
    """How many trials fit side by side; ValueError naming every short resource when not even one does."""
    needed = {r: a for r, a in need.items() if a > 0}
    short = [
        f"{a:g} {r} (the Ray cluster has {float(available.get(r, 0.0)):g})"
        for r, a in needed.items()
        if float(available.get(r, 0.0)) + 1e-9 < a
    ]
    if short:
        raise ValueError(
            f"one trial needs {' and '.join(short)} for {_describe(need)}; lower cluster.num_workers / "
            "cpus_per_worker / gpus_per_worker, or add nodes"
        )
    return max(1, min((math.floor(float(available[r]) / a + 1e-9) for r, a in needed.items()), default=1))


def _describe(need: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in need.items())


# --------------------------------------------------------------------------------------------------------------------
# MLflow: parent run on the driver, one nested run per trial


def _experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:///"):  # keep artifacts next to the db, not under the cwd
        db = Path(client.tracking_uri.removeprefix("sqlite:///")).resolve()
        location = (db.parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_parent_run(tracking_uri: str, experiment: str, sweep_name: str, params: Mapping[str, Any]) -> str:
    """The sweep's parent run id: the existing one for a resumed sweep, else a new run."""
    client = registry.connect(tracking_uri)
    experiment_id = _experiment_id(client, experiment)
    runs = client.search_runs([experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep_name}'")
    found = [r for r in runs if TRIAL_TAG not in r.data.tags]
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=sweep_name, tags={SWEEP_TAG: sweep_name})
    client.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


def start_trial_run(
    tracking_uri: str,
    experiment: str,
    parent_run_id: str,
    sweep_name: str,
    trial_id: str,
    run_name: str,
    cfg: TrainConfig,
) -> str:
    """Create (or find, on resume) the trial's MLflow run nested under the parent.

    The Train loop's tracker attaches to it because it carries the tag `arm.run_name` = the Ray Train run name.
    """
    client = registry.connect(tracking_uri)
    experiment_id = _experiment_id(client, experiment)
    found = client.search_runs([experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    if found:
        return found[0].info.run_id
    tags = {"mlflow.parentRunId": parent_run_id, SWEEP_TAG: sweep_name, TRIAL_TAG: trial_id, RUN_NAME_TAG: run_name}
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    client.log_batch(run.info.run_id, params=_params(flatten(cfg)))
    return run.info.run_id


def _params(values: Mapping[str, Any]):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in safe_params(dict(values)).items()]


# --------------------------------------------------------------------------------------------------------------------
# trial driver


def train_driver_fn(
    config: dict[str, Any],
    *,
    base: dict[str, Any],
    sweep_name: str,
    parent_run_id: str,
    tracking_uri: str,
    experiment: str,
) -> None:
    """One Tune trial: base recipe + this trial's sampled overrides -> a TorchTrainer reporting to Tune."""
    trial_id = ray.tune.get_context().get_trial_id()
    name = f"train-trial_id={trial_id}"
    overrides = {k: (v.item() if hasattr(v, "item") else v) for k, v in config.items()}
    cfg = dataclasses.replace(apply_overrides(TrainConfig.from_dict(base), overrides), experiment_name=name)
    plan = launch.validate(cfg)
    start_trial_run(tracking_uri, experiment, parent_run_id, sweep_name, trial_id, plan.run_name, cfg)
    launch.build_trainer(plan, tracking_uri, name=name, callbacks=[TuneReportCallback()]).fit()


def _sweep_path(cfg: TrainConfig, sweep_name: str) -> tuple[str, str]:
    """(Tune storage_path, experiment path) with local paths made absolute."""
    root = cfg.storage_path if storage.is_s3(cfg.storage_path) else str(Path(cfg.storage_path).expanduser().resolve())
    return root, storage.join(root, sweep_name)


def tune(
    cfg: TrainConfig,
    space: Mapping[str, Any] | None = None,
    *,
    num_samples: int,
    sweep_name: str,
    use_optuna: bool = False,
    max_concurrent: int | None = None,
    grace_period: int = 1,
    seed: int | None = None,
    check_resources: bool = True,
) -> ray.tune.ResultGrid:
    """Run (or resume) the sweep `sweep_name` over `space` (default: recipes.SEARCH_SPACES for the recipe).

    Args:
        cfg: base finetune config; its storage_path holds the Tune experiment `<storage_path>/<sweep_name>` and the
            trials' Train runs `<storage_path>/<sweep_name>-trials/train-trial_id=...`.
        space: {dotted key: ("loguniform", lo, hi) | ("uniform", lo, hi) | ("choice", [...]) | ("grid", [...]) |
            ("randint", lo, hi) | fixed value}.
        max_concurrent: trials at once; None derives it from the cluster's free CPUs / GPUs and one trial's needs.
        check_resources: raise ValueError before starting when one trial needs more than the cluster has (turn off
            on autoscaling clusters whose GPU nodes are not up yet, and pass max_concurrent).
    Returns:
        The ResultGrid; `best_trial(results)` picks the best checkpoint.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    space = dict(recipes.SEARCH_SPACES.get(cfg.recipe) or recipes.SEARCH_SPACES[cfg.task]) if space is None else space
    param_space = build_param_space(space, cfg)
    if use_optuna and any(isinstance(s, tuple) and s and s[0] == "grid" for s in space.values()):
        raise ValueError("Optuna search cannot take grid entries; use choice instead")
    tracking_uri = (
        cfg.tracking.tracking_uri or default_tracking_uri(cfg.storage_path) or registry.resolve_tracking_uri()
    )
    experiment = cfg.tracking.experiment_name or cfg.recipe
    root, path = _sweep_path(cfg, sweep_name)
    base = dataclasses.replace(
        cfg,
        storage_path=storage.join(root, f"{sweep_name}-trials"),
        tracking=dataclasses.replace(cfg.tracking, tracking_uri=tracking_uri, experiment_name=experiment),
    )
    launch.validate(base)  # data path, classes, batch geometry: fail before Ray starts
    launch.init_ray()
    need = trial_resources(base)
    if check_resources or max_concurrent is None:
        fits = max_concurrent_trials(need, ray.cluster_resources())
        max_concurrent = max_concurrent or fits
    parent_run_id = start_parent_run(
        tracking_uri,
        experiment,
        sweep_name,
        {
            "num_samples": num_samples,
            "search_space": space,
            "recipe": cfg.recipe,
            "use_optuna": use_optuna,
            "max_concurrent_trials": max_concurrent,
        },
    )
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            train_driver_fn,
            base=base.to_dict(),
            sweep_name=sweep_name,
            parent_run_id=parent_run_id,
            tracking_uri=tracking_uri,
            experiment=experiment,
        ),
        {"cpu": TRIAL_DRIVER_CPUS},
    )
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # step-level reports carry no val_acc1
    if ray.tune.Tuner.can_restore(path):
        logger.info("resuming sweep %s from %s", sweep_name, path)
        tuner = ray.tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=_tune_config(cfg, num_samples, max_concurrent, use_optuna, grace_period, seed),
            run_config=ray.tune.RunConfig(name=sweep_name, storage_path=root),
        )
    logger.info(
        "sweep %s: %d samples, <= %d concurrent trials of %s, MLflow parent run %s",
        sweep_name,
        num_samples,
        max_concurrent,
        _describe(need),
        parent_run_id,
    )
    results = tuner.fit()
    _finish_parent_run(tracking_uri, parent_run_id, results)
    return results


def _tune_config(
    cfg: TrainConfig, num_samples: int, max_concurrent: int, use_optuna: bool, grace_period: int, seed: int | None
) -> ray.tune.TuneConfig:
    scheduler = ASHAScheduler(
        metric=METRIC,
        mode=MODE,
        time_attr="epoch",
        max_t=cfg.optim.epochs,
        grace_period=min(grace_period, cfg.optim.epochs),
        reduction_factor=2,
    )
    search_alg = None
    if use_optuna:
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=METRIC, mode=MODE, seed=seed)
    return ray.tune.TuneConfig(
        num_samples=num_samples, max_concurrent_trials=max_concurrent, scheduler=scheduler, search_alg=search_alg
    )


# --------------------------------------------------------------------------------------------------------------------
# results


def best_trial(results: ray.tune.ResultGrid, metric: str = METRIC) -> dict[str, Any]:
    """Best reported `metric` over every trial's history that came with a checkpoint.

    Returns {"trial_id", metric, "checkpoint_path", "metrics" (that report's metrics), "config"}.
    """
    best: dict[str, Any] | None = None
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or metric not in frame or CHECKPOINT_PATH_KEY not in frame:
            continue
        rows = frame[frame[metric].notna() & frame[CHECKPOINT_PATH_KEY].notna()]
        if rows.empty:
            continue
        row = rows.loc[rows[metric].idxmax()]
        if best is None or row[metric] > best[metric]:
            metrics = {k: v for k, v in row.items() if isinstance(v, numbers.Real) and not math.isnan(v)}
            best = {
                "trial_id": result.metrics.get("trial_id", row.get("trial_id")),
                metric: float(row[metric]),
                "checkpoint_path": row[CHECKPOINT_PATH_KEY],
                "metrics": metrics,
                "config": dict(result.config),
            }
    if best is None:
        raise ValueError(f"no trial reported {metric!r} together with a checkpoint")
    return best


def _finish_parent_run(tracking_uri: str, parent_run_id: str, results: ray.tune.ResultGrid) -> None:
    """Log the best trial on the parent run and close it; close trial runs ASHA stopped (left RUNNING)."""
    client = registry.connect(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    running = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    for child in client.search_runs([experiment_id], running):  # Tune killed the driver before the loop closed it
        client.set_terminated(child.info.run_id, status="KILLED")
    try:
        best = best_trial(results)
    except ValueError:
        client.set_terminated(parent_run_id, status="FAILED")
        return
    client.log_metric(parent_run_id, f"best_{METRIC}", best[METRIC])
    client.set_tag(parent_run_id, "best_trial_id", str(best["trial_id"]))
    client.set_tag(parent_run_id, "best_checkpoint", _checkpoint_uri(best["checkpoint_path"]))
    client.set_terminated(parent_run_id, status="FINISHED" if not results.errors else "FAILED")


def _checkpoint_uri(path: str) -> str:
    """Tune reports storage paths without a scheme for S3 ("bucket/key"); local ones are absolute."""
    return path if path.startswith(("/", "s3://")) or Path(path).exists() else f"s3://{path}"


def trial_run_id(tracking_uri: str, experiment: str, trial_id: str) -> str | None:
    """MLflow run id of a trial (tag arm.trial_id)."""
    client = registry.connect(tracking_uri)
    found = client.search_runs([_experiment_id(client, experiment)], f"tags.`{TRIAL_TAG}` = '{trial_id}'")
    return found[0].info.run_id if found else None


def register_best(
    results: ray.tune.ResultGrid, cfg: TrainConfig, name: str, *, aliases: tuple[str, ...] = ("champion",)
):
    """Register the sweep's best checkpoint as a new version of `name` (tags: metrics, trial, source run)."""
    best = best_trial(results)
    tracking_uri = (
        cfg.tracking.tracking_uri or default_tracking_uri(cfg.storage_path) or registry.resolve_tracking_uri()
    )
    run_id = trial_run_id(tracking_uri, cfg.tracking.experiment_name or cfg.recipe, str(best["trial_id"]))
    return registry.register_checkpoint(
        _checkpoint_uri(best["checkpoint_path"]),
        name,
        aliases=aliases,
        metrics={k: v for k, v in best["metrics"].items() if k.startswith("val")},
        run_id=run_id,
        tracking_uri=tracking_uri,
        tags={"trial_id": best["trial_id"]},
    )


# --------------------------------------------------------------------------------------------------------------------
# job entry point


def main(argv: list[str]) -> ray.tune.ResultGrid | None:
    """`jobs/tune_finetune.py` body: sweep flags, then `--flag value` / dotted overrides of the base recipe."""
    parser = argparse.ArgumentParser(description="Ray Tune sweep over a finetune recipe", allow_abbrev=False)
    parser.add_argument("--recipe", help="finetune recipe; default finetune_<size of --model>, else finetune_base")
    parser.add_argument("--sweep-name", required=True, help="re-running the same name resumes the sweep")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--optuna", action="store_true", help="Optuna TPE search instead of random sampling")
    parser.add_argument("--max-concurrent", type=int, default=None)
    parser.add_argument(
        "--space", action="append", default=[], help="key=sampler:args, e.g. optim.blr=uniform:1e-4:1e-3"
    )
    parser.add_argument("--register", metavar="MODEL_NAME", help="register the best checkpoint under this name")
    args, rest = parser.parse_known_args(argv)
    base = recipes.get(args.recipe) if args.recipe else launch.recipe_for("finetune", rest)
    cfg, dry_run = cli.apply_cli(base, rest)
    space = {
        **(recipes.SEARCH_SPACES.get(cfg.recipe) or recipes.SEARCH_SPACES[cfg.task]),
        **parse_space_args(args.space),
    }
    if dry_run:
        cli.print_config(cfg)
        return None
    results = tune(
        cfg,
        space,
        num_samples=args.num_samples,
        sweep_name=args.sweep_name,
        use_optuna=args.optuna,
        max_concurrent=args.max_concurrent,
    )
    best = best_trial(results)
    logger.info("best trial %s: %s=%.4f checkpoint %s", best["trial_id"], METRIC, best[METRIC], best["checkpoint_path"])
    if args.register:
        version = register_best(results, cfg, args.register)
        logger.info("registered models:/%s/%s (aliases %s)", args.register, version.version, version.aliases)
    return results
