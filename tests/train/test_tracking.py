"""MLflow tracking: rank 0 logs params / metrics / image grids to the default sqlite store; other ranks are no-ops;
a restarted run re-attaches to the same MLflow run; secrets never become params."""

import mlflow
import pytest
import torch

from arm_platform.tracking import (
    MlflowTracker,
    NullTracker,
    build_tracker,
    default_artifact_location,
    default_tracking_uri,
    safe_params,
)


def test_default_uri_is_sqlite_in_storage_unless_env_set(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(str(tmp_path)) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert default_tracking_uri(str(tmp_path)) == "http://mlflow:5000"
    assert default_tracking_uri("s3://bucket/runs") == "http://mlflow:5000"


def test_remote_storage_without_tracking_uri_is_refused(monkeypatch):
    """MLflow's own default would be a sqlite file in the job's temporary working directory: lost at job end."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match=r"s3://bucket/runs is remote but no MLflow tracking URI.*MLFLOW_TRACKING_URI"):
        default_tracking_uri("s3://bucket/runs")


def test_pruned_checkpoint_tags_are_deleted(tmp_path):
    from arm_platform.tracking import prune_checkpoint_tags

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    for step in (4, 6, 8):
        client.set_tag(run_id, f"checkpoint.step_{step:09d}", f"s3://b/run/checkpoint_{step:09d}")
    client.set_tag(run_id, "checkpoint.latest", "s3://b/run/checkpoint_000000008")
    gone = prune_checkpoint_tags(client, run_id, {"s3://b/run/checkpoint_000000006", "s3://b/run/checkpoint_000000008"})
    assert gone == ["checkpoint.step_000000004"]
    tags = client.get_run(run_id).data.tags
    assert {k for k in tags if k.startswith("checkpoint.")} == {
        "checkpoint.step_000000006",
        "checkpoint.step_000000008",
        "checkpoint.latest",
    }


def test_secrets_are_not_params():
    kept = safe_params({"optim.blr": 1e-4, "aws_secret_access_key": "x", "storage.token": "y"})
    assert kept == {"optim.blr": 1e-4}


def test_rank0_logs_and_restart_reattaches(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = default_tracking_uri(str(tmp_path))
    kwargs = dict(
        tracking_uri=uri,
        experiment="exp",
        run_name="run-a",
        params={"optim.blr": 1e-4},
        system_metrics=False,
        artifact_location=default_artifact_location(str(tmp_path)),
    )
    assert type(build_tracker(rank=1, **kwargs)) is NullTracker
    tracker = build_tracker(rank=0, **kwargs)
    assert isinstance(tracker, MlflowTracker)
    tracker.log_metrics({"loss": 1.5}, step=1)
    tracker.log_images(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), "pred_epoch0001")
    tracker.finish("FAILED")
    again = build_tracker(rank=0, **kwargs)
    again.log_metrics({"loss": 1.0}, step=2)
    again.finish()
    assert again.run_id == tracker.run_id
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"optim.blr": "0.0001"} and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 1.5), (2, 1.0)]
    assert (tmp_path / "mlartifacts").is_dir()
    assert [a.path for a in client.list_artifacts(run.info.run_id, "predictions")] == ["predictions/pred_epoch0001.png"]
