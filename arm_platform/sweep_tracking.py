"""Bookkeeping of a Tune sweep: MLflow parent / trial runs and their honest end states, the record of trials that
failed for good, and the sweep's results (the best report, registering it). `sweep.py` keeps the Tune orchestration.

The sweep driver creates (or, on resume, finds) a parent run tagged `arm.sweep_name`; each trial driver creates a child
run tagged `mlflow.parentRunId`, `arm.trial_id` and `arm.run_name` (= its Ray Train run name), which the Train loop's
tracker (tracking.py) attaches to and closes FINISHED (or FAILED when the loop raises). What the loop cannot close is
closed here: `TrialRunCloser` (a Tune callback on the sweep driver) marks a trial's run KILLED when Tune stopped the
trial early (ASHA) and FAILED when the trial errored for good (its driver died, or Train gave up), and
`finish_parent_run` logs the best trial on the parent and closes it. `FailedTrialLog` keeps the ids of trials that
failed for good in storage, so a resumed sweep does not re-run them (see `sweep._mark_failed_in_saved_state`).
Trials are ranked by `sweep_acc1` = max(val_acc1, val_ema_acc1) of each report; `register_best` exports the weights
that scored it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray.tune

from arm_platform import registry, storage
from arm_platform.config import TrainConfig, flatten
from arm_platform.tracking import RUN_NAME_TAG, default_tracking_uri, safe_params

logger = logging.getLogger(__name__)

SWEEP_TAG, TRIAL_TAG = "arm.sweep_name", "arm.trial_id"
PARENT_TAG = "mlflow.parentRunId"
RUNNING = "RUNNING"
METRIC = "sweep_acc1"
"""What ASHA and `best_trial` rank by: max(val_acc1, val_ema_acc1) of a report (added to every report)."""
RAW_METRIC, EMA_METRIC = "val_acc1", "val_ema_acc1"
CHECKPOINT_PATH_KEY = "checkpoint_path"
"""Metric key TuneReportCallback adds with the storage path of the reported checkpoint (no scheme for S3)."""


def experiment_id(client, name: str) -> str:  # noqa: ANN001 (MlflowClient)
    """Id of MLflow experiment `name`, created if needed (sqlite stores keep artifacts next to the db)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:///"):  # keep artifacts next to the db, not under the cwd
        db = Path(client.tracking_uri.removeprefix("sqlite:///")).resolve()
        location = (db.parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_parent_run(tracking_uri: str, experiment: str, sweep_name: str, params: Mapping[str, Any]) -> str:
    """The sweep's parent run id: the existing one for a resumed sweep (set RUNNING again), else a new run."""
    client = registry.connect(tracking_uri)
    exp_id = experiment_id(client, experiment)
    runs = client.search_runs([exp_id], f"tags.`{SWEEP_TAG}` = '{sweep_name}'")
    found = [r for r in runs if TRIAL_TAG not in r.data.tags]
    if found:
        client.update_run(found[0].info.run_id, status=RUNNING)
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=sweep_name, tags={SWEEP_TAG: sweep_name})
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
    """Create (or find, on resume / trial restart) the trial's MLflow run nested under the parent.

    The Train loop's tracker attaches to it because it carries the tag `arm.run_name` = the Ray Train run name.
    """
    client = registry.connect(tracking_uri)
    exp_id = experiment_id(client, experiment)
    found = client.search_runs([exp_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    if found:
        return found[0].info.run_id
    tags = {PARENT_TAG: parent_run_id, SWEEP_TAG: sweep_name, TRIAL_TAG: trial_id, RUN_NAME_TAG: run_name}
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    client.log_batch(run.info.run_id, params=_params(flatten(cfg)))
    return run.info.run_id


def _params(values: Mapping[str, Any]):  # noqa: ANN202 (mlflow Param list)
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in safe_params(dict(values)).items()]


def trial_run_id(tracking_uri: str, experiment: str, trial_id: str) -> str | None:
    """MLflow run id of a trial (tag arm.trial_id), None when the trial never got as far as creating it."""
    client = registry.connect(tracking_uri)
    found = client.search_runs([experiment_id(client, experiment)], f"tags.`{TRIAL_TAG}` = '{trial_id}'")
    return found[0].info.run_id if found else None


def close_trial_run(tracking_uri: str, experiment: str, trial_id: str, status: str) -> str | None:
    """Set the trial's run to `status` if it is still RUNNING; returns the run's final status (None: no run)."""
    client = registry.connect(tracking_uri)
    found = client.search_runs([experiment_id(client, experiment)], f"tags.`{TRIAL_TAG}` = '{trial_id}'")
    if not found:
        return None
    run = found[0]
    if run.info.status != RUNNING:
        return run.info.status
    client.set_terminated(run.info.run_id, status=status)
    logger.info("trial %s: MLflow run %s closed as %s", trial_id, run.info.run_id, status)
    return status


class TrialRunCloser(ray.tune.Callback):
    """Close a trial's MLflow run when Tune ends the trial and the Train loop could not.

    A trial that trains to its last step closes its own run (FINISHED) before its driver returns, so a run still
    RUNNING when Tune completes the trial was stopped early (ASHA): KILLED. A trial that errored for good: FAILED.
    Errors talking to MLflow are logged, never raised into Tune's event loop.
    """

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:  # noqa: ANN001
        self._close(trial.trial_id, "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:  # noqa: ANN001
        self._close(trial.trial_id, "FAILED")

    def _close(self, trial_id: str, status: str) -> None:
        try:
            close_trial_run(self.tracking_uri, self.experiment, trial_id, status)
        except Exception as err:  # noqa: BLE001 (bookkeeping must not end the sweep)
            logger.warning("could not close the MLflow run of trial %s as %s: %s", trial_id, status, err)


FAILED_TRIALS_FILE = "failed_trials.json"
"""In `<storage>/<sweep>-trials/`: ids of the trials that failed for good (after their retries)."""


class FailedTrialLog(ray.tune.Callback):
    """Records each trial that failed for good in FAILED_TRIALS_FILE (read back by `_mark_failed_in_saved_state`)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:  # noqa: ANN001
        try:
            failed = sorted(set(read_failed_trials(self.uri)) | {trial.trial_id})
            storage.write_bytes_atomic(self.uri, json.dumps(failed).encode())
        except (OSError, ValueError) as err:  # bookkeeping must not end the sweep
            logger.warning("could not record failed trial %s in %s: %s", trial.trial_id, self.uri, err)


def read_failed_trials(uri: str) -> list[str]:
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else []


def finish_parent_run(
    tracking_uri: str, parent_run_id: str, best: Mapping[str, Any] | None, *, failed: bool, best_uri: str = ""
) -> None:
    """Close trial runs still RUNNING (KILLED), log the best trial on the parent run and close it.

    Args:
        best: `sweep.best_trial(...)` or None when no trial reported a metric with a checkpoint (parent: FAILED).
        failed: some trial errored (parent: FAILED even with a best trial).
        best_uri: storage URI of the best checkpoint (tag `best_checkpoint`).
    """
    client = registry.connect(tracking_uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    running = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = '{RUNNING}'"
    for child in client.search_runs([exp_id], running):  # a trial Tune ended without telling the callback
        client.set_terminated(child.info.run_id, status="KILLED")
    if best is None:
        client.set_terminated(parent_run_id, status="FAILED")
        return
    client.log_metric(parent_run_id, "best_acc1", float(best["score"]))
    client.set_tag(parent_run_id, "best_trial_id", str(best["trial_id"]))
    client.set_tag(parent_run_id, "best_weights", str(best["weights"]))
    client.set_tag(parent_run_id, "best_checkpoint", best_uri)
    client.set_terminated(parent_run_id, status="FAILED" if failed else "FINISHED")


def abort_parent_run(tracking_uri: str, parent_run_id: str) -> None:
    """The sweep driver itself stopped (error, Ctrl-C): the parent run is KILLED (a re-run resumes and reopens it)."""
    try:
        registry.connect(tracking_uri).set_terminated(parent_run_id, status="KILLED")
    except Exception as err:  # noqa: BLE001 (never mask the original error)
        logger.warning("could not close the sweep's parent run %s: %s", parent_run_id, err)


def tracking_uri_for(cfg: TrainConfig) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else sqlite next to local storage (ValueError for s3:// storage)."""
    return cfg.tracking.tracking_uri or default_tracking_uri(cfg.storage_path)


def scored(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """`metrics` plus METRIC = max(val_acc1, val_ema_acc1) when the report carries val metrics."""
    out = dict(metrics)
    values = [float(out[k]) for k in (RAW_METRIC, EMA_METRIC) if _is_number(out.get(k))]
    if values:
        out[METRIC] = max(values)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


# --------------------------------------------------------------------------------------------------------------------
# results: the best report and its registration


def checkpoint_uri(path: str) -> str:
    """Storage URI of a checkpoint path Tune / Train report: local paths are absolute, S3 ones "bucket/key"."""
    return path if path.startswith(("/", "s3://")) else f"s3://{path}"


def best_trial(results: ray.tune.ResultGrid) -> dict[str, Any]:
    """The best report with a checkpoint that still verifies, over every trial's history, by max(raw, EMA) top-1.

    Returns {"trial_id", "score" (= METRIC), "weights" ("raw" | "ema": which weights scored it), "val_acc1",
    "checkpoint_path", "checkpoint_uri", "metrics" (that report's numeric metrics), "config"}. Reports whose
    checkpoint Train pruned (or that fails its manifest) are skipped with a warning.
    """
    from arm_platform.train.checkpoint import CheckpointError, verify_checkpoint

    # ties (tiny runs often score alike) go to the later checkpoint path: the same pick on every call and resume
    candidates = sorted(_candidates(results), key=lambda c: (c["score"], c["checkpoint_uri"]), reverse=True)
    for best in candidates:
        try:
            verify_checkpoint(best["checkpoint_uri"], deep=False)
        except (CheckpointError, FileNotFoundError) as err:
            logger.warning("skipping trial %s's checkpoint: %s", best["trial_id"], err)
            continue
        return best
    raise ValueError(f"no trial reported {RAW_METRIC!r} together with a checkpoint that still exists")


def _candidates(results: ray.tune.ResultGrid):  # noqa: ANN202 (generator of dicts)
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or RAW_METRIC not in frame or CHECKPOINT_PATH_KEY not in frame:
            continue
        for _, row in frame[frame[RAW_METRIC].notna() & frame[CHECKPOINT_PATH_KEY].notna()].iterrows():
            metrics = {k: float(v) for k, v in row.items() if _is_number(v)}
            ema = metrics.get(EMA_METRIC, -math.inf)
            yield {
                "trial_id": str((result.metrics or {}).get("trial_id", row.get("trial_id"))),
                "score": max(metrics[RAW_METRIC], ema),
                "weights": "ema" if ema >= metrics[RAW_METRIC] else "raw",
                RAW_METRIC: metrics[RAW_METRIC],
                "checkpoint_path": row[CHECKPOINT_PATH_KEY],
                "checkpoint_uri": checkpoint_uri(row[CHECKPOINT_PATH_KEY]),
                "metrics": metrics,
                "config": dict(result.config),
            }


def register_best(
    results: ray.tune.ResultGrid, cfg: TrainConfig, name: str, *, aliases: tuple[str, ...] = ("champion",)
):  # noqa: ANN201 (ModelVersion)
    """Register the sweep's best checkpoint with the weights that scored it (idempotent: a re-run returns it)."""
    best = best_trial(results)
    tracking_uri = tracking_uri_for(cfg)
    run_id = trial_run_id(tracking_uri, cfg.tracking.experiment_name or cfg.recipe, best["trial_id"])
    return registry.register_checkpoint(
        best["checkpoint_uri"],
        name,
        aliases=aliases,
        metrics={k: v for k, v in best["metrics"].items() if k.startswith("val_")},
        run_id=run_id,
        tracking_uri=tracking_uri,
        tags={"trial_id": best["trial_id"]},
        weights=best["weights"],
    )
