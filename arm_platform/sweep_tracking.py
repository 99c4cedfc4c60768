"""Bookkeeping of a Tune sweep: the sweep's MLflow parent run, one nested run per trial, honest end states, and the
record of trials that failed for good.

The sweep driver creates (or, on resume, finds) a parent run tagged `arm.sweep_name`; each trial driver creates a child
run tagged `mlflow.parentRunId`, `arm.trial_id` and `arm.run_name` (= its Ray Train run name), which the Train loop's
tracker (tracking.py) attaches to and closes FINISHED (or FAILED when the loop raises). What the loop cannot close is
closed here: `TrialRunCloser` (a Tune callback on the sweep driver) marks a trial's run KILLED when Tune stopped the
trial early (ASHA) and FAILED when the trial errored for good (its driver died, or Train gave up), and
`finish_parent_run` logs the best trial on the parent and closes it. `FailedTrialLog` keeps the ids of trials that
failed for good in storage, so a resumed sweep does not re-run them (see `sweep._mark_failed_in_saved_state`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray.tune

from arm_platform import registry, storage
from arm_platform.config import TrainConfig, flatten
from arm_platform.tracking import RUN_NAME_TAG, safe_params

logger = logging.getLogger(__name__)

SWEEP_TAG, TRIAL_TAG = "arm.sweep_name", "arm.trial_id"
PARENT_TAG = "mlflow.parentRunId"
RUNNING = "RUNNING"


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
