"""Sweep bookkeeping without Ray: trial runs' MLflow end states, ranking by raw / EMA top-1, held-back final reports."""

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from arm_platform import recipes, sweep, sweep_tracking
from arm_platform.train.checkpoint import write_manifest


@pytest.fixture()
def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _trial_run(uri: str, parent: str, trial_id: str) -> str:
    cfg = recipes.get("finetune_tiny")
    return sweep_tracking.start_trial_run(uri, "exp", parent, "s1", trial_id, f"train-trial_id={trial_id}", cfg)


def test_trial_runs_end_killed_failed_or_as_the_loop_left_them(sqlite_uri):
    """Tune ending a trial closes its run only if still RUNNING: complete -> KILLED, error -> FAILED."""
    parent = sweep_tracking.start_parent_run(sqlite_uri, "exp", "s1", {"num_samples": 3})
    finished, stopped, failed = (_trial_run(sqlite_uri, parent, t) for t in ("t1", "t2", "t3"))
    client = MlflowClient(sqlite_uri)
    client.set_terminated(finished, status="FINISHED")  # what the Train loop does at its last step
    closer = sweep_tracking.TrialRunCloser(sqlite_uri, "exp")
    for trial_id in ("t1", "t2"):
        closer.on_trial_complete(0, [], SimpleNamespace(trial_id=trial_id))
    closer.on_trial_error(0, [], SimpleNamespace(trial_id="t3"))
    closer.on_trial_error(0, [], SimpleNamespace(trial_id="never-started"))  # no run: nothing to do, no error
    status = {run_id: client.get_run(run_id).info.status for run_id in (finished, stopped, failed)}
    assert status == {finished: "FINISHED", stopped: "KILLED", failed: "FAILED"}
    assert client.get_run(stopped).data.tags[sweep_tracking.PARENT_TAG] == parent
    assert sweep_tracking.start_parent_run(sqlite_uri, "exp", "s1", {}) == parent  # a resumed sweep reopens it
    assert client.get_run(parent).info.status == "RUNNING"


def test_unreachable_tracking_store_does_not_break_the_callback():
    closer = sweep_tracking.TrialRunCloser("http://127.0.0.1:9", "exp")  # nothing listens on port 9
    closer.on_trial_complete(0, [], SimpleNamespace(trial_id="t1"))  # logged, not raised


def _checkpoint(folder) -> str:
    folder.mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, folder / "model.pt")
    (folder / "config.json").write_text(json.dumps({}))
    write_manifest(folder)
    return str(folder)


def _result(trial_id: str, rows: list[dict]) -> SimpleNamespace:
    return SimpleNamespace(metrics_dataframe=pd.DataFrame(rows), metrics={"trial_id": trial_id}, config={})


def test_best_trial_ranks_by_the_better_weights_and_skips_pruned_checkpoints(tmp_path):
    """Each report scores max(raw, EMA); the best report whose checkpoint still verifies wins, with its weights."""
    kept = [_checkpoint(tmp_path / name) for name in ("a1", "a2", "b1")]
    pruned = str(tmp_path / "b2")  # Train's num_to_keep deleted it (its raw top-1 was low)
    results = [
        _result("a", [
            {"val_acc1": 40.0, "val_ema_acc1": 30.0, "checkpoint_path": kept[0], "epoch": 1},
            {"val_acc1": 50.0, "val_ema_acc1": 55.0, "checkpoint_path": kept[1], "epoch": 2},
            {"loss": 1.0, "checkpoint_path": None, "epoch": 2.5},  # a step-level report: no val metrics
        ]),
        _result("b", [
            {"val_acc1": 52.0, "val_ema_acc1": 20.0, "checkpoint_path": kept[2], "epoch": 1},
            {"val_acc1": 10.0, "val_ema_acc1": 70.0, "checkpoint_path": pruned, "epoch": 2},
        ]),
    ]  # fmt: skip
    best = sweep.best_trial(results)
    assert (best["trial_id"], best["weights"], best["score"], best["checkpoint_uri"]) == ("a", "ema", 55.0, kept[1])
    assert best["metrics"]["val_acc1"] == 50.0 and best["metrics"]["val_ema_acc1"] == 55.0
    raw_only = [_result("c", [{"val_acc1": 33.0, "checkpoint_path": kept[2]}])]  # EMA off: no val_ema_acc1
    assert (sweep.best_trial(raw_only)["weights"], sweep.best_trial(raw_only)["score"]) == ("raw", 33.0)
    with pytest.raises(ValueError, match="no trial reported 'val_acc1' together with a checkpoint"):
        sweep.best_trial([_result("d", [{"val_acc1": 90.0, "checkpoint_path": pruned}])])


def test_checkpoint_uris_get_their_scheme_back():
    assert sweep.checkpoint_uri("bucket/runs/s-trials/train-trial_id=x/checkpoint_000000004") == (
        "s3://bucket/runs/s-trials/train-trial_id=x/checkpoint_000000004"
    )
    assert sweep.checkpoint_uri("/abs/run/checkpoint_000000004") == "/abs/run/checkpoint_000000004"
    assert sweep.checkpoint_uri("s3://b/k") == "s3://b/k"


def test_reports_carry_the_sweep_metric_and_the_final_one_waits_for_the_driver():
    """Every forwarded report gets sweep_acc1 = max(raw, EMA); the final step's report is not forwarded."""
    sent = []
    report = object.__new__(sweep.ReportToTune)  # its __init__ needs a Tune session for the queue
    report._training_actor_item_queue = SimpleNamespace(put=sent.append)
    report.final_step = 8
    report.after_report(None, [{"step": 4, "epoch": 1, "val_acc1": 20.0, "val_ema_acc1": 25.0}], None)
    report.after_report(None, [{"step": 6, "epoch": 1.5, "loss": 2.0}], None)
    report.after_report(None, [{"step": 8, "epoch": 2, "val_acc1": 30.0}], None)
    assert [m.get(sweep.METRIC) for m in sent] == [25.0, None] and [m["step"] for m in sent] == [4, 6]
    assert sweep.scored({"val_acc1": 30.0, "val_ema_acc1": float("nan")})[sweep.METRIC] == 30.0


def test_trial_start_waits_are_bounded():
    """Dataset planning that cannot get its CPUs fails with an error naming it; Train stops retrying worker placement
    after about the same time (Ray's default: every 60 s, forever)."""
    import threading

    import ray.train

    release = threading.Event()
    with pytest.raises(TimeoutError, match="planning the datasets within 0.05 s; free now: "):
        sweep._within(0.05, "planning the datasets", release.wait)
    release.set()
    trainer = SimpleNamespace(run_config=SimpleNamespace(failure_config=ray.train.FailureConfig(max_failures=3)))
    sweep._bound_worker_start(trainer, 900.0)
    failure = trainer.run_config.failure_config
    assert (failure.controller_failure_limit, failure.max_failures) == (15, 3)  # 15 tries x 60 s, workers: untouched
