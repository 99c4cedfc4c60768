"""[ray] Runs that survive faults, on a local folder and on S3 (moto): a run killed mid-way whose newest checkpoint
was then truncated resumes from the newest verified checkpoint and ends at the exact final step; MLflow's checkpoint
tags name only checkpoints that exist; re-submitting the finished run returns its result without training."""

import json

import mlflow
import pytest
from tiny import TINY, no_training

from arm_platform import launch, recipes, storage
from arm_platform.train import integrity
from arm_platform.train.loop import FAULT_ENV


@pytest.fixture(scope="module")
def ray_s3(s3_bucket):
    """Local Ray on 2 CPUs, started after the moto S3 env is set so its workers inherit it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield s3_bucket
    ray.shutdown()


def _args(data: str, storage_root: str, tracking_uri: str, max_failures: int) -> list[str]:
    # 256 images / (2 workers x 32) = 4 steps/epoch x 2 epochs; reports at steps 3, 4 (epoch), 6, 8 (epoch)
    return [
        "--data_path", data, "--output_dir", storage_root, "--batch_size", "32", "--epochs", "2",
        "--warmup_epochs", "1", "--world_size", "2", "--experiment_name", "faulty",
        "checkpoint.every_n_steps=3", "checkpoint.num_to_keep=2", f"checkpoint.max_failures={max_failures}",
        "cluster.cpus_per_worker=0.5", "data.decode_cpus=0.25", "data.max_train_samples=256", "data.max_val_samples=64",
        "tracking.log_every_n_steps=2", "tracking.vis_every_n_epochs=0", "tracking.probe_every_n_epochs=2",
        "tracking.system_metrics=false", f"tracking.tracking_uri={tracking_uri}", *TINY,
    ]  # fmt: skip


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_truncated_checkpoint_after_a_crash_resumes_from_the_newest_verified_one(
    where, ray_s3, fm_data, tmp_path, monkeypatch
):
    root = str(tmp_path / "runs") if where == "local" else f"s3://{ray_s3}/runs-{tmp_path.name}"
    run_uri = storage.join(root, "faulty")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    marker = tmp_path / "fault.marker"
    monkeypatch.setenv(FAULT_ENV, f"7:{marker}")
    with pytest.raises(Exception, match="injected fault at step 7"):
        launch.fit(recipes.get("pretrain_tiny"), _args(fm_data, root, tracking_uri, max_failures=0))
    monkeypatch.delenv(FAULT_ENV)
    # the node died while writing step 6: its state.pt is cut in half (num_to_keep=2 pruned step 3)
    assert [f.name for f in integrity.list_checkpoints(run_uri)] == ["checkpoint_000000004", "checkpoint_000000006"]
    state = storage.join(run_uri, "checkpoint_000000006", "state.pt")
    data = storage.read_bytes(state)
    storage.write_bytes_atomic(state, data[: len(data) // 2])

    result = launch.fit(recipes.get("pretrain_tiny"), _args(fm_data, root, tracking_uri, max_failures=1))

    assert result.metrics["step"] == 8 and result.metrics["epoch"] == 2
    names = [f.name for f in integrity.list_checkpoints(run_uri)]
    assert names == ["checkpoint_000000006", "checkpoint_000000008"]  # step 6 re-done from the verified step 4
    for name in names:
        integrity.verify_checkpoint(storage.join(run_uri, name))
    assert storage.exists(storage.join(run_uri, "corrupt-checkpoint_000000006", "state.pt"))
    record = json.loads(storage.read_bytes(storage.join(run_uri, launch.RUN_FILE)))
    assert record["finished"] is True

    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pretrain_tiny").experiment_id])
    tagged = {v for k, v in run.data.tags.items() if k.startswith("checkpoint.step_")}
    assert tagged == {storage.join(run_uri, n) for n in names}  # pruned checkpoints lost their tags
    assert run.data.tags["checkpoint.latest"] == storage.join(run_uri, "checkpoint_000000008")
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    assert steps == {2, 4, 6, 8}

    monkeypatch.setattr(launch, "build_trainer", no_training)
    again = launch.fit(recipes.get("pretrain_tiny"), _args(fm_data, root, tracking_uri, max_failures=1))
    assert again.metrics["step"] == 8 and again.checkpoint.path == result.checkpoint.path
