"""Ray Tune sweeps over finetuning hyperparameters, one Ray Train V2 `TorchTrainer` per trial.

Follows Ray's `doc/source/train/doc_code/train_tune_interop.py`: a per-trial `train_driver_fn(config)` builds the
TrainConfig from the base recipe plus the trial's sampled dotted overrides and fits a TorchTrainer named
`train-trial_id=<trial id>` (no timestamps: a restarted trial re-attaches to its Train run). Trials are ranked, and
ASHA stops weak ones, on `sweep_acc1` = the better of the raw model's and the EMA's val top-1 in each report (the
weights `register_best` exports). Optuna optionally proposes trials. Every trial is an MLflow run nested under the
sweep's parent run (`sweep_tracking.py`). Re-running the same sweep name resumes it (`Tuner.restore`) with the first
run's settings; trials that failed for good stay failed. Storage may be a local folder or s3://.
Search spaces are data in `recipes.SEARCH_SPACES`: {"optim.blr": ("loguniform", 1e-4, 2e-3), ...}.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import ray.tune
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from arm_platform import launch, recipes, storage, sweep_tracking
from arm_platform.config import TrainConfig, apply_overrides
from arm_platform.search_space import build_param_space
from arm_platform.security import install_log_redaction, validate_name
from arm_platform.sweep_resources import (
    READ_METADATA_TASK_CPUS,
    TRIAL_DRIVER_CPUS,
    describe,
    max_concurrent_trials,
    trial_holdings,
    trial_resources,
)
from arm_platform.sweep_tracking import (
    CHECKPOINT_PATH_KEY,
    METRIC,
    SWEEP_TAG,
    TRIAL_TAG,
    best_trial,
    checkpoint_uri,
    register_best,
    scored,
    start_parent_run,
    start_trial_run,
    tracking_uri_for,
)
from arm_platform.train.integrity import repair_run

__all__ = [
    "METRIC",
    "SWEEP_TAG",
    "TRIAL_TAG",
    "best_trial",
    "checkpoint_uri",
    "register_best",
    "scored",
    "start_parent_run",
    "start_trial_run",
    "tune",
]

logger = logging.getLogger(__name__)

MODE = "max"
TRIAL_START_TIMEOUT_S = 900.0
"""Bound on each wait of a trial for cluster resources (Ray Data planning, Train worker placement)."""
FAULT_ENV = "ARM_SWEEP_FAULT_INJECT"
"""Test hook, a marker file path: the first trial to start its workers gets its driver SIGKILLed, once."""


# --------------------------------------------------------------------------------------------------------------------
# trial driver


class ReportToTune(TuneReportCallback):
    """TuneReportCallback that adds METRIC to each report and holds back the run's final report.

    The final report (step == final_step) reaches Tune from the trial driver once the Train run has ended, i.e. after
    the loop closed its MLflow run: Tune (ASHA's last rung) may stop a trial the moment it sees a result, and a stop
    on the final result used to kill the workers before they closed their run (left RUNNING, then marked KILLED).
    """

    def __init__(self, final_step: int) -> None:
        super().__init__()
        self.final_step = final_step

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:  # noqa: ANN001
        if metrics and metrics[0].get("step") == self.final_step:
            return
        super().after_report(run_context, [scored(metrics[0]), *metrics[1:]], checkpoint)


class KillDriverAtWorkerStart(WorkerGroupCallback):
    """FAULT_ENV test hook (Train controller callback): once per marker file, SIGKILL the trial driver after the
    workers and their placement group exist and before training starts, as the OOM killer would, then block until
    Ray ends this controller (its owner died), so the trial's Train run can never finish."""

    def __init__(self, pid: int, marker: str) -> None:
        self.pid, self.marker = pid, marker

    def after_worker_group_start(self, worker_group) -> None:  # noqa: ANN001
        try:
            with open(self.marker, "x") as f:
                f.write(str(self.pid))
        except FileExistsError:
            return
        logger.warning("%s: killing trial driver pid %d", FAULT_ENV, self.pid)
        os.kill(self.pid, signal.SIGKILL)
        if not threading.Event().wait(TRIAL_START_TIMEOUT_S):
            raise RuntimeError(f"the Train controller outlived its killed driver for {TRIAL_START_TIMEOUT_S:g} s")


def train_driver_fn(
    config: dict[str, Any],
    *,
    base: dict[str, Any],
    sweep_name: str,
    parent_run_id: str,
    tracking_uri: str,
    experiment: str,
    start_timeout_s: float = TRIAL_START_TIMEOUT_S,
    fault: str | None = None,
) -> None:
    """One Tune trial: base recipe + this trial's sampled overrides -> a TorchTrainer reporting to Tune."""
    install_log_redaction()  # a trial driver is its own process
    trial_id = ray.tune.get_context().get_trial_id()
    name = f"train-trial_id={trial_id}"
    overrides = {k: (v.item() if hasattr(v, "item") else v) for k, v in config.items()}
    cfg = dataclasses.replace(apply_overrides(TrainConfig.from_dict(base), overrides), experiment_name=name)
    plan = launch.validate(cfg)
    start_trial_run(tracking_uri, experiment, parent_run_id, sweep_name, trial_id, plan.run_name, cfg)
    repair_run(plan.run_uri)  # a retried / resumed trial restarts from its newest checkpoint that verifies
    callbacks = [ReportToTune(plan.total_steps)] + ([KillDriverAtWorkerStart(os.getpid(), fault)] if fault else [])
    trainer = _within(
        start_timeout_s,
        f"trial {trial_id}: Ray Data could not plan the datasets (its Parquet sampling tasks need "
        f"{READ_METADATA_TASK_CPUS:g} CPU each)",
        lambda: launch.build_trainer(plan, tracking_uri, name=name, callbacks=callbacks),
    )
    _bound_worker_start(trainer, start_timeout_s)
    result = trainer.fit()
    launch.sync_checkpoint_tags(plan.run_uri, plan.run_name, tracking_uri)  # no tags of checkpoints Train pruned
    metrics = dict(result.metrics or {})
    if metrics.get("step") == plan.total_steps and result.checkpoint is not None:  # the report held back
        ray.tune.report(scored({**metrics, CHECKPOINT_PATH_KEY: result.checkpoint.path}))


def _within(timeout_s: float, what: str, fn: Callable[[], Any]) -> Any:
    """fn() in a helper thread; TimeoutError naming `what` and the free cluster resources after `timeout_s`."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="arm-trial-start")
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        free = describe(ray.available_resources()) if ray.is_initialized() else "unknown (Ray not initialised)"
        raise TimeoutError(
            f"{what} within {timeout_s:g} s; free now: {free or 'nothing'}. Another trial (or a dead one's leftover "
            "placement group) holds the cluster: see `ray list placement-groups`"
        ) from None


def _bound_worker_start(trainer, timeout_s: float) -> None:  # noqa: ANN001 (TorchTrainer)
    """Give up on placing the Train workers after ~timeout_s (Ray Train V2 retries its 60 s start timeout forever)."""
    per_try = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0))
    failure = trainer.run_config.failure_config or ray.train.FailureConfig()
    limit = max(1, math.ceil(timeout_s / per_try))
    trainer.run_config.failure_config = dataclasses.replace(failure, controller_failure_limit=limit)


# --------------------------------------------------------------------------------------------------------------------
# sweep


def _sweep_path(cfg: TrainConfig, sweep_name: str) -> tuple[str, str]:
    """(storage root, Tune experiment URI) with local paths made absolute."""
    root = launch.absolute(cfg.storage_path)
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
    start_timeout_s: float = TRIAL_START_TIMEOUT_S,
) -> ray.tune.ResultGrid:
    """Run (or resume) the sweep `sweep_name` over `space` (default: recipes.SEARCH_SPACES for the recipe).

    Args:
        cfg: base finetune config; its storage_path (local or s3://) holds the Tune experiment
            `<storage_path>/<sweep_name>` and the trials' Train runs `<storage_path>/<sweep_name>-trials/train-...`.
        space: {dotted key: ("loguniform", lo, hi) | ("uniform", lo, hi) | ("choice", [...]) | ("grid", [...]) |
            ("randint", lo, hi) | fixed value}.
        max_concurrent: trials at once; None derives it from the cluster's CPUs / GPUs and one trial's needs. A
            resumed sweep keeps the value (and search settings) of its first run.
        check_resources: raise ValueError before starting when one trial needs more than the cluster has (turn off
            on autoscaling clusters whose GPU nodes are not up yet, and pass max_concurrent).
        start_timeout_s: a trial that waits longer than this for resources (dataset planning, worker placement)
            fails with an error naming what it waited for, instead of waiting forever.
    Returns:
        The ResultGrid; `best_trial(results)` picks the best checkpoint. A trial whose driver dies is retried up to
        `checkpoint.max_failures` times (its Train run resumes from its last checkpoint), then fails.
    """
    install_log_redaction()
    validate_name(sweep_name, "sweep name")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    space = dict(recipes.SEARCH_SPACES.get(cfg.recipe) or recipes.SEARCH_SPACES[cfg.task]) if space is None else space
    param_space = build_param_space(space, cfg)
    if use_optuna and any(isinstance(s, tuple) and s and s[0] == "grid" for s in space.values()):
        raise ValueError("Optuna search cannot take grid entries; use choice instead")
    tracking_uri = tracking_uri_for(cfg)
    experiment = cfg.tracking.experiment_name or cfg.recipe
    root, _ = _sweep_path(cfg, sweep_name)
    base = dataclasses.replace(  # local paths made absolute: trial drivers run in their own working folders
        cfg,
        storage_path=storage.join(root, f"{sweep_name}-trials"),
        finetune=launch.absolute(cfg.finetune) if cfg.finetune else "",
        data=dataclasses.replace(cfg.data, data_path=launch.absolute(cfg.data.data_path)),
        tracking=dataclasses.replace(cfg.tracking, tracking_uri=tracking_uri, experiment_name=experiment),
    )
    launch.validate(base)  # data path, classes, batch geometry: fail before Ray starts
    launch.init_ray()
    need = trial_resources(base)
    if check_resources or max_concurrent is None:
        fits = max_concurrent_trials(need, ray.cluster_resources(), trial_holdings(base))
        max_concurrent = max_concurrent or fits
    settings = {"num_samples": num_samples, "search_space": space, "recipe": cfg.recipe, "use_optuna": use_optuna}
    parent_run_id = start_parent_run(
        tracking_uri, experiment, sweep_name, settings | {"max_concurrent_trials": max_concurrent}
    )
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            train_driver_fn,
            base=base.to_dict(),
            sweep_name=sweep_name,
            parent_run_id=parent_run_id,
            tracking_uri=tracking_uri,
            experiment=experiment,
            start_timeout_s=start_timeout_s,
            fault=os.environ.get(FAULT_ENV),
        ),
        {"cpu": TRIAL_DRIVER_CPUS},
    )
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # step-level reports carry no val metrics
    tune_config = _tune_config(cfg, num_samples, max_concurrent, use_optuna, grace_period, seed)
    tuner = _tuner(trainable, param_space, tune_config, cfg, root, sweep_name, tracking_uri, experiment)
    logger.info("sweep %s: <= %d trials at once, each %s", sweep_name, max_concurrent, describe(need))
    try:
        results = tuner.fit()
    except BaseException:
        sweep_tracking.abort_parent_run(tracking_uri, parent_run_id)
        raise
    failed = bool(results.errors or sweep_tracking.read_failed_trials(_failed_log(root, sweep_name)))
    _finish(tracking_uri, parent_run_id, results, failed)
    return results


def _failed_log(root: str, sweep_name: str) -> str:
    return storage.join(root, f"{sweep_name}-trials", sweep_tracking.FAILED_TRIALS_FILE)


def _tuner(
    trainable: Any,
    param_space: dict[str, Any],
    tune_config: ray.tune.TuneConfig,
    cfg: TrainConfig,
    root: str,
    sweep_name: str,
    tracking_uri: str,
    experiment: str,
) -> ray.tune.Tuner:
    """A new Tuner, or the sweep's saved one restored (its TuneConfig, search state and RunConfig come back).

    Trials that failed for good are not re-run on restore: Tune would re-queue them outside its searcher's count of
    live trials, so the searcher would start new ones next to them, beyond `max_concurrent_trials`.
    """
    fs, fs_root = storage.filesystem_for(root) if storage.is_s3(root) else (None, root)
    path = f"{fs_root.rstrip('/')}/{sweep_name}"
    failed_log = _failed_log(root, sweep_name)
    if ray.tune.Tuner.can_restore(path, storage_filesystem=fs):
        failed = sweep_tracking.read_failed_trials(failed_log)
        logger.info("resuming sweep %s from its saved state; not re-running failed trials %s", sweep_name, failed)
        _mark_failed_in_saved_state(fs or pafs.LocalFileSystem(), path, failed)
        return ray.tune.Tuner.restore(
            path, trainable=trainable, resume_unfinished=True, resume_errored=False, storage_filesystem=fs
        )
    run_config = ray.tune.RunConfig(
        name=sweep_name,
        storage_path=fs_root,
        storage_filesystem=fs,
        failure_config=ray.tune.FailureConfig(max_failures=cfg.checkpoint.max_failures),
        callbacks=[sweep_tracking.TrialRunCloser(tracking_uri, experiment), sweep_tracking.FailedTrialLog(failed_log)],
    )
    return ray.tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def _mark_failed_in_saved_state(fs: pafs.FileSystem, path: str, failed: list[str]) -> None:
    """Set the recorded failed trials to ERROR in Tune's saved experiment state before restoring it.

    Ray 2.60 does not re-save a trial whose actor died (`TuneController._schedule_trial_stop` returns before
    `_mark_trial_to_checkpoint` when the actor is already gone): its saved status stays RUNNING, so a restore would
    resume it as unfinished, outside the searcher's count of live trials (more than max_concurrent_trials at once).
    """
    infos = fs.get_file_info(pafs.FileSelector(path))
    for info in (i for i in infos if i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json")):
        with fs.open_input_stream(info.path) as f:
            state = json.loads(f.read())
        changed = False
        for entry in state["trial_data"]:
            trial, meta = json.loads(entry[0]), json.loads(entry[1])
            if trial["trial_id"] in failed and trial["status"] not in ("ERROR", "TERMINATED"):
                trial["status"] = "ERROR"
                meta.update(error_filename="error.txt", pickled_error_filename="error.pkl")  # ResultGrid.errors
                entry[0], entry[1], changed = json.dumps(trial, indent=2), json.dumps(meta), True
        if changed:
            with fs.open_output_stream(info.path) as f:
                f.write(json.dumps(state).encode())


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


def _finish(tracking_uri: str, parent_run_id: str, results: ray.tune.ResultGrid, failed: bool) -> None:
    try:
        best = best_trial(results)
    except ValueError:
        best = None
    uri = best["checkpoint_uri"] if best else ""
    sweep_tracking.finish_parent_run(tracking_uri, parent_run_id, best, failed=failed, best_uri=uri)
