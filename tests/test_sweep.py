"""Tune sweeps: search-space parsing, resource checks, and a 2-trial tiny sweep with nested MLflow runs."""

import dataclasses
import json
from pathlib import Path

import pytest
from ray import tune as ray_tune
from test_e2e_cluster import val_accuracy

from arm_platform import recipes, search_space, sweep
from arm_platform.config import apply_overrides

# A finetune_tiny that trains in seconds: 2-block 32-wide model, 64 images, one worker.
TINY_FINETUNE = [
    "model.embed_dim=32", "model.depth=2", "optim.epochs=2", "optim.warmup_epochs=0", "optim.batch_size=16",
    "optim.ema_decay=none", "data.max_train_samples=64", "data.max_val_samples=32", "cluster.num_workers=1",
    "cluster.cpus_per_worker=0.5", "data.decode_cpus=0.25", "tracking.system_metrics=false",
    "tracking.log_every_n_steps=2",
]  # fmt: skip


def test_search_space_specs_become_tune_samplers():
    space = search_space.build_param_space(recipes.SEARCH_SPACES["finetune"], recipes.get("finetune_base"))
    assert set(space) == set(recipes.SEARCH_SPACES["finetune"])
    blr = space["optim.blr"]
    assert isinstance(blr, ray_tune.search.sample.Float) and (blr.lower, blr.upper) == (1e-4, 2e-3)
    assert isinstance(blr.get_sampler(), ray_tune.search.sample.Float._LogUniform)
    assert space["data.mixup"].categories == [0.0, 0.2, 0.8]
    assert search_space.build_param_space({"optim.epochs": 3})["optim.epochs"] == 3
    assert search_space.build_param_space({"data.cutmix": ("grid", [0.0, 1.0])})["data.cutmix"] == {
        "grid_search": [0.0, 1.0]
    }


def test_bad_search_space_entries_raise_value_error():
    base = recipes.get("finetune_tiny")
    with pytest.raises(ValueError, match="unknown sampler 'lognormal'"):
        search_space.build_param_space({"optim.blr": ("lognormal", 1e-4, 1e-3)}, base)
    with pytest.raises(ValueError, match="unknown config key 'optim.blrr'.*did you mean 'blr'"):
        search_space.build_param_space({"optim.blrr": ("uniform", 1e-4, 1e-3)}, base)


def test_cli_space_edits_parse_samplers_and_fixed_values():
    parsed = search_space.parse_space_args(
        ["optim.blr=loguniform:1e-4:2e-3", "data.mixup=choice:0,0.8", "optim.epochs=5"]
    )
    assert parsed == {"optim.blr": ("loguniform", 1e-4, 2e-3), "data.mixup": ("choice", [0, 0.8]), "optim.epochs": 5}
    with pytest.raises(ValueError, match="not key=sampler:args"):
        search_space.parse_space_args(["optim.blr"])


def test_trial_resources_and_concurrency_from_cluster_size():
    base = recipes.get("finetune_base")  # 8 workers x 1 GPU x 8 CPUs
    need = sweep.trial_resources(base)
    assert need["GPU"] == 8 and need["CPU"] == pytest.approx(sweep.TRIAL_DRIVER_CPUS + 64 + 1.0)
    assert sweep.max_concurrent_trials(need, {"CPU": 384, "GPU": 32}) == 4  # four 8-GPU nodes
    assert sweep.max_concurrent_trials(need, {"CPU": 100, "GPU": 32}) == 1  # CPU-bound
    tiny = sweep.trial_resources(apply_overrides(recipes.get("finetune_tiny"), TINY_FINETUNE))
    # driver + max(worker + one Ray Data decode task = 0.75, one 1-CPU Parquet sampling task while planning)
    assert tiny == {"CPU": pytest.approx(0.1 + 1.0)}
    assert sweep.max_concurrent_trials(tiny, {"CPU": 2}) == 1 and sweep.max_concurrent_trials(tiny, {"CPU": 4.4}) == 4
    # the others keep only driver + worker + decode task (0.85) while one plans: 0.85 + 1.1 <= 2 -> two at once
    held = sweep.trial_holdings(apply_overrides(recipes.get("finetune_tiny"), TINY_FINETUNE))
    assert held == {"CPU": pytest.approx(0.1 + 0.75)}
    assert [sweep.max_concurrent_trials(tiny, {"CPU": c}, held) for c in (1.1, 1.94, 2, 2.79, 2.8)] == [1, 1, 2, 2, 3]
    assert sweep.max_concurrent_trials(need, {"CPU": 384, "GPU": 32}, sweep.trial_holdings(base)) == 4  # GPU-bound


def test_parquet_sampling_tasks_request_what_trial_resources_reserves():
    """Ray Data's Parquet sampling task (started by read_parquet in the trial driver) asks Ray's default 1 CPU."""
    from ray.data._internal.datasource.parquet_datasource import _fetch_parquet_file_info
    from ray.data._internal.remote_fn import cached_remote_fn

    options = cached_remote_fn(_fetch_parquet_file_info)._default_options
    assert float(options.get("num_cpus") or 1.0) == sweep.READ_METADATA_TASK_CPUS  # unset: a task's default, 1 CPU


def test_trial_needing_more_gpus_than_the_cluster_has_is_rejected():
    need = sweep.trial_resources(recipes.get("finetune_base"))
    with pytest.raises(ValueError, match=r"one trial needs 8 GPU \(the Ray cluster has 0\) for CPU="):
        sweep.max_concurrent_trials(need, {"CPU": 100.0})
    with pytest.raises(ValueError, match=r"needs 65.1 CPU \(the Ray cluster has 2\) and 8 GPU"):
        sweep.max_concurrent_trials(need, {"CPU": 2.0})


@pytest.fixture(scope="module")
def fashion_shards(tmp_path_factory):
    """Tiny Fashion-MNIST shards (64 train / 32 val images)."""
    from arm_platform.config import DataConfig
    from arm_platform.data import fashion_mnist

    if fashion_mnist.find_root() is None:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("fmnist")
    fashion_mnist.prepare(str(out), DataConfig(shard_size_mb=1.0, num_parallel=1), limit_per_split=64)
    return str(out)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3_bucket):
    """This process connected to a private 3-CPU head (two tiny trials of 1.1 CPU fit) started after the moto S3 env,
    so its workers reach the bucket (Train V2 needs the dashboard and a findable RAY_ADDRESS)."""
    from ray_cluster import connected_head

    with connected_head(3, tmp_path_factory.mktemp("ray") / "ray-start.log"):
        yield


def _tiny_cfg(shards: str, storage_path: str, tracking_uri: str, experiment: str, *extra: str):
    cfg = apply_overrides(recipes.get("finetune_tiny"), [*TINY_FINETUNE, f"data.data_path={shards}", *extra])
    cfg = dataclasses.replace(cfg, storage_path=storage_path)
    return apply_overrides(cfg, {"tracking.tracking_uri": tracking_uri, "tracking.experiment_name": experiment})


def _runs(uri: str, experiment: str):
    """(parent run, trial runs) of the sweep in `experiment`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if sweep.TRIAL_TAG not in r.data.tags]
    return parent, [r for r in runs if sweep.TRIAL_TAG in r.data.tags]


@pytest.mark.ray
@pytest.mark.slow
def test_two_trial_sweep_nests_mlflow_runs_and_resumes(tmp_path, fashion_shards, ray_head):
    """Two trials run as nested MLflow runs under one parent, each FINISHED with its metrics when tune() returns;
    the best has a checkpoint; re-running resumes (nothing re-run) and registering again gives the same version."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _tiny_cfg(fashion_shards, str(tmp_path / "runs"), uri, "sweep-test")
    space = {"optim.blr": ("grid", [5e-4, 2e-3])}
    # grace_period = epochs: no early-stopping rung, so both trials train to the end whichever reports first
    results = sweep.tune(cfg, space, num_samples=1, sweep_name="tiny-sweep", grace_period=2)
    assert len(results) == 2 and not results.errors
    assert all(r.metrics["epoch"] == 2 and r.metrics[sweep.METRIC] == r.metrics["val_acc1"] for r in results)
    best = sweep.best_trial(results)
    assert 0.0 <= best["score"] <= 100.0 and best["weights"] == "raw"  # EMA off
    assert best["score"] == max(r.metrics_dataframe["val_acc1"].max() for r in results)
    assert (tmp_path / "runs" / "tiny-sweep-trials").is_dir()
    assert {"model.pt", "config.json", "state.pt", "manifest.json"} <= {
        p.name for p in Path(best["checkpoint_uri"]).iterdir()
    }

    parent, children = _runs(uri, "sweep-test")
    assert len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags[sweep.TRIAL_TAG] for c in children} == {r.metrics["trial_id"] for r in results}
    assert all("val_acc1" in c.data.metrics and c.info.status == "FINISHED" for c in children)  # the loop logged here
    assert sorted(float(c.data.params["optim.blr"]) for c in children) == [5e-4, 2e-3]
    assert parent.data.metrics["best_acc1"] == pytest.approx(best["score"])
    assert parent.data.tags["best_trial_id"] == best["trial_id"] and parent.info.status == "FINISHED"
    version = sweep.register_best(results, cfg, "tiny")

    again = sweep.tune(cfg, space, num_samples=1, sweep_name="tiny-sweep")  # same name: restored, nothing re-run
    assert sorted(r.metrics["trial_id"] for r in again) == sorted(r.metrics["trial_id"] for r in results)
    assert len(_runs(uri, "sweep-test")[1]) == 2
    assert int(sweep.register_best(again, cfg, "tiny").version) == int(version.version) == 1


@pytest.mark.ray
@pytest.mark.slow
def test_s3_sweep_outlives_a_dead_trial_and_registers_the_weights_that_won(
    tmp_path, fashion_shards, ray_head, s3_bucket, monkeypatch
):
    """Storage on S3 (moto), EMA on. The first trial's driver is SIGKILLed once its workers hold their placement
    group (an OOM kill): that trial fails (max_failures=0), its MLflow run is FAILED, its placement groups are released
    and the other trial runs to the end. The champion's pulled weights score exactly its exported_acc1 on the val
    images, and so do the other weights of the same checkpoint for their metric. Resuming re-runs nothing (the failed
    trial stays failed: Ray saved it as RUNNING) and registering again gives the same version."""
    import ray

    from arm_platform import registry, storage
    from arm_platform.config import TrainConfig

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = ("optim.ema_decay=0.9", "checkpoint.max_failures=0")
    cfg = _tiny_cfg(fashion_shards, f"s3://{s3_bucket}/runs", uri, "s3-sweep", *extra)
    monkeypatch.setenv(sweep.FAULT_ENV, str(tmp_path / "killed-driver"))
    space = {"optim.blr": ("grid", [5e-4, 2e-3])}
    results = sweep.tune(cfg, space, num_samples=1, sweep_name="s3-sweep", max_concurrent=1, grace_period=2)
    assert (tmp_path / "killed-driver").is_file() and len(results) == 2 and len(results.errors) == 1
    assert _eventually(lambda: all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()))
    parent, children = _runs(uri, "s3-sweep")
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"] and parent.info.status == "FAILED"

    best = sweep.best_trial(results)
    assert best["checkpoint_uri"].startswith(f"s3://{s3_bucket}/runs/s3-sweep-trials/train-trial_id=")
    version = sweep.register_best(results, cfg, "arm-s3")
    tags = {k: float(v) for k, v in version.tags.items() if k.startswith(("val_", "exported_"))}
    assert {"val_acc1", "val_ema_acc1"} <= set(tags) and version.tags["weights"] == best["weights"]
    assert tags["exported_acc1"] == pytest.approx(best["score"], abs=1e-4)
    other = {"raw": "ema", "ema": "raw"}[best["weights"]]
    ck, metrics = best["checkpoint_uri"], best["metrics"]
    registry.register_checkpoint(ck, "arm-s3", aliases=("other",), metrics=metrics, weights=other, tracking_uri=uri)
    for alias, metric in (("champion", "exported_acc1"), ("other", "val_ema_acc1" if other == "ema" else "val_acc1")):
        model = registry.load_model(f"models:/arm-s3@{alias}", dst_dir=tmp_path / alias, tracking_uri=uri)
        pulled_cfg = TrainConfig.from_dict(json.loads((tmp_path / alias / "config.json").read_text()))
        assert val_accuracy(model, pulled_cfg) == pytest.approx(tags[metric], abs=1e-4), alias

    (failed,) = [c.data.tags[sweep.TRIAL_TAG] for c in children if c.info.status == "FAILED"]
    failed_run = f"s3://{s3_bucket}/runs/s3-sweep-trials/train-trial_id={failed}"  # must not be touched again
    before = sorted(storage.list_files(failed_run))
    again = sweep.tune(cfg, space, num_samples=1, sweep_name="s3-sweep")
    assert len(again.errors) == 1 and int(sweep.register_best(again, cfg, "arm-s3").version) == int(version.version)
    assert before and sorted(storage.list_files(failed_run)) == before


def _eventually(condition, timeout_s: float = 120.0) -> bool:
    """Poll `condition` until true or `timeout_s` passed (Ray releases placement groups asynchronously)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True
