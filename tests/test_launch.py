"""launch.fit: bad inputs fail before Ray starts; [ray] pretrain with an injected worker fault resumes to the exact
final step, logs to MLflow, a finished run is returned as is, and finetuning from its checkpoint beats chance."""

import json
from pathlib import Path

import mlflow
import pytest
from tiny import TINY, no_training

from arm_platform import launch, recipes
from arm_platform.evaluate import evaluate_checkpoints
from arm_platform.train.loop import FAULT_ENV


def _pretrain_args(data: str, storage: Path) -> list[str]:
    return [
        "--data_path",
        data,
        "--output_dir",
        str(storage),
        "--batch_size",
        "32",
        "--epochs",
        "2",
        "--warmup_epochs",
        "1",
        "--world_size",
        "2",
        "data.max_train_samples=256",
        "data.max_val_samples=128",
        "checkpoint.every_n_steps=3",
        "tracking.log_every_n_steps=2",
        "tracking.vis_every_n_epochs=1",
        "tracking.probe_every_n_epochs=2",
        *TINY,
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "arm_nope_pz16"], "unknown model 'arm_nope_pz16'"),
        (["--data_path", "/nonexistent/shards"], "/nonexistent/shards"),
        (["--batch_size", "512"], "batch not divisible"),
        (["--accum_iter", "8"], "batch not divisible"),
    ],
)
def test_bad_pretrain_inputs_fail_before_ray(argv, message, fm_data, tmp_path):
    import ray

    args = ["--data_path", fm_data, "--output_dir", str(tmp_path), "data.max_train_samples=256", *TINY]
    with pytest.raises(ValueError, match=message):
        launch.fit(recipes.get("pretrain_tiny"), args + argv)
    assert not ray.is_initialized()


def test_missing_finetune_checkpoint_and_foreign_run_fail_before_ray(fm_data, tmp_path):
    import ray

    args = ["--data_path", fm_data, "--output_dir", str(tmp_path), *TINY]
    with pytest.raises(ValueError, match="finetune checkpoint '/no/such/ckpt' does not exist"):
        launch.fit(recipes.get("finetune_tiny"), [*args, "--finetune", "/no/such/ckpt"])
    run = tmp_path / "exp"
    run.mkdir()
    (run / launch.RUN_FILE).write_text(json.dumps({"config_hash": "0123456789", "finished": False}))
    with pytest.raises(ValueError, match="already holds a different config"):
        launch.fit(recipes.get("pretrain_tiny"), [*args, "--experiment_name", "exp"])
    assert not ray.is_initialized()


def test_s3_storage_without_a_tracking_uri_fails_before_ray(fm_data, monkeypatch):
    """MLflow's default would be a sqlite file in the job's temporary working directory, lost when the job ends."""
    import ray

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["--data_path", fm_data, "--output_dir", "s3://bucket/runs", "data.max_train_samples=256", *TINY]
    with pytest.raises(ValueError, match="s3://bucket/runs is remote but no MLflow tracking URI"):
        launch.fit(recipes.get("pretrain_tiny"), args)
    assert not ray.is_initialized()


def test_run_names_are_deterministic_and_config_sensitive():
    a, b = recipes.get("pretrain_tiny"), recipes.get("pretrain_tiny")
    assert launch.config_hash(a) == launch.config_hash(b)
    c, _ = launch.prepare(b, ["--blr", "1e-3"])
    d, _ = launch.prepare(b, ["--output_dir", "/elsewhere"])
    assert launch.config_hash(c) != launch.config_hash(a) and launch.config_hash(d) == launch.config_hash(a)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_pretrain_survives_a_worker_fault_then_finetune_beats_chance(ray_cluster, fm_data, tmp_path, monkeypatch):
    storage = tmp_path / "runs"
    marker = tmp_path / "fault.marker"
    monkeypatch.setenv(FAULT_ENV, f"5:{marker}")
    result = launch.fit(recipes.get("pretrain_tiny"), _pretrain_args(fm_data, storage))
    monkeypatch.delenv(FAULT_ENV)

    # 256 images / (2 workers x 32) = 4 steps/epoch, 2 epochs; reports at 3, 4 (epoch), 6, 8 (epoch); keep 3
    assert marker.read_text() == "5", "the injected fault did not fire"
    assert result.metrics["step"] == 8 and result.metrics["epoch"] == 2
    run_dir = Path(result.path)
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [
        "checkpoint_000000004",
        "checkpoint_000000006",
        "checkpoint_000000008",
    ]
    assert {p.name for p in Path(result.checkpoint.path).iterdir()} >= {"state.pt", "model.pt", "config.json"}

    mlflow.set_tracking_uri(f"sqlite:///{storage / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["pretrain_tiny"], output_format="list")
    client = mlflow.tracking.MlflowClient()
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert {m.step for m in losses} == {2, 4, 6, 8}
    assert run.data.params["optim.batch_size"] == "32" and "ops_backend" in run.data.params
    assert run.data.tags["checkpoint.latest"].endswith("checkpoint_000000008")
    assert "knn_acc1" in run.data.metrics and "img_per_s" in run.data.metrics
    monitors = {"probe_acc1", "val_loss", "knn_acc1_random_init", "probe_acc1_random_init", "loss_constant_baseline"}
    assert monitors <= set(run.data.metrics)
    # the gray target (model.target_chans=1): 0.82 on the 10,000 test images; three RGB copies gave 0.65 here
    assert 0.7 < run.data.metrics["loss_constant_baseline"] < 0.9
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "predictions")]
    assert "predictions/pred_epoch0002.png" in artifacts

    with monkeypatch.context() as patched:  # finished: returned from storage, never trained again
        patched.setattr(launch, "build_trainer", no_training)
        again = launch.fit(recipes.get("pretrain_tiny"), _pretrain_args(fm_data, storage))
    assert again.metrics["step"] == 8 and again.checkpoint.path == result.checkpoint.path

    finetune = launch.fit(
        recipes.get("finetune_tiny"),
        [
            "--data_path",
            fm_data,
            "--output_dir",
            str(storage),
            "--finetune",
            result.checkpoint.path,
            "--batch_size",
            "32",
            "--epochs",
            "3",
            "--warmup_epochs",
            "0.5",
            "--lr",
            "5e-3",
            "--world_size",
            "2",
            "data.max_train_samples=512",
            "data.max_val_samples=256",
            *TINY,
        ],
    )
    assert finetune.metrics["step"] == 3 * 8
    # 10 classes: chance is 10% (+-1.9% on 256 images); 24 tiny steps reach 17-20%
    assert finetune.metrics["val_acc1"] > 15.0
    assert "val_ema_acc1" in finetune.metrics and "val_acc5" in finetune.metrics

    # official --eval --resume: model.pt holds the EMA weights, so it scores what the run reported for its EMA
    evaluated = launch.fit(
        recipes.get("finetune_tiny"),
        ["--data_path", fm_data, "--output_dir", str(storage), "--eval", "--resume", finetune.checkpoint.path,
         "--batch_size", "32", "--world_size", "2", "data.max_val_samples=256", *TINY],
    )  # fmt: skip
    assert evaluated["val_count"] == 256
    assert evaluated["val_acc1"] == pytest.approx(finetune.metrics["val_ema_acc1"], abs=1e-6)
    assert evaluated["val_acc5"] == pytest.approx(finetune.metrics["val_ema_acc5"], abs=1e-6)
    # several checkpoints in one pass (the demo's test-set scores): each one's numbers, in order
    eval_cfg, _ = launch.prepare(
        recipes.get("finetune_tiny"),
        ["--data_path", fm_data, "--output_dir", str(storage), "--batch_size", "32", "--world_size", "2",
         "data.max_val_samples=256", *TINY],
    )  # fmt: skip
    ema, raw = evaluate_checkpoints(eval_cfg, [(finetune.checkpoint.path, "model"), (finetune.checkpoint.path, "raw")])
    assert ema["val_acc1"] == pytest.approx(finetune.metrics["val_ema_acc1"], abs=1e-6) and ema["val_count"] == 256
    assert raw["val_acc1"] == pytest.approx(finetune.metrics["val_acc1"], abs=1e-6) and raw["val_count"] == 256
    assert raw["val_loss"] == pytest.approx(finetune.metrics["val_loss"], rel=1e-5)
