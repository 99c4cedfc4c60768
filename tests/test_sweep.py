"""Tune sweeps: search-space parsing, resource checks, and a 2-trial tiny sweep with nested MLflow runs."""

import dataclasses

import pytest
from ray import tune as ray_tune

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
    assert tiny == {"CPU": pytest.approx(0.1 + 0.5 + 0.25)}  # driver + worker + one Ray Data task
    assert sweep.max_concurrent_trials(tiny, {"CPU": 1.5}) == 1 and sweep.max_concurrent_trials(tiny, {"CPU": 4}) == 4


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
def ray_2cpu(tmp_path_factory):
    """This process connected to a private 2-CPU head (Train V2 needs the dashboard and a findable RAY_ADDRESS)."""
    import ray
    from ray_cluster import start_head, stop_head

    head = start_head(num_cpus=2, log_path=tmp_path_factory.mktemp("ray") / "ray-start.log")
    try:
        ray.init(address=head.gcs_address, configure_logging=False)
        yield
    finally:
        ray.shutdown()
        stop_head(head)


@pytest.mark.ray
@pytest.mark.slow
def test_two_trial_sweep_nests_mlflow_runs_and_resumes(tmp_path, fashion_shards, ray_2cpu):
    """Two trials run as nested MLflow runs under one parent; the best has a checkpoint; re-running resumes."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = apply_overrides(recipes.get("finetune_tiny"), TINY_FINETUNE + [f"data.data_path={fashion_shards}"])
    cfg = dataclasses.replace(cfg, storage_path=str(tmp_path / "runs"))
    cfg = apply_overrides(cfg, {"tracking.tracking_uri": uri, "tracking.experiment_name": "sweep-test"})
    space = {"optim.blr": ("grid", [5e-4, 2e-3])}
    results = sweep.tune(cfg, space, num_samples=1, sweep_name="tiny-sweep")
    assert len(results) == 2 and not results.errors
    best = sweep.best_trial(results)
    assert 0.0 <= best["val_acc1"] <= 100.0
    assert best["val_acc1"] == max(r.metrics_dataframe["val_acc1"].max() for r in results)
    assert (tmp_path / "runs" / "tiny-sweep-trials").is_dir()
    assert {"model.pt", "config.json", "state.pt"} <= {p.name for p in _path(best["checkpoint_path"]).iterdir()}

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("sweep-test").experiment_id
    runs = client.search_runs([experiment_id])
    (parent,) = [r for r in runs if sweep.TRIAL_TAG not in r.data.tags]
    children = [r for r in runs if sweep.TRIAL_TAG in r.data.tags]
    assert len(children) == 2 and len(runs) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags[sweep.TRIAL_TAG] for c in children} == {r.metrics["trial_id"] for r in results}
    assert all("val_acc1" in c.data.metrics and c.info.status == "FINISHED" for c in children)  # the loop logged here
    assert sorted(float(c.data.params["optim.blr"]) for c in children) == [5e-4, 2e-3]
    assert parent.data.metrics["best_val_acc1"] == pytest.approx(best["val_acc1"])
    assert parent.data.tags["best_trial_id"] == best["trial_id"] and parent.info.status == "FINISHED"

    again = sweep.tune(cfg, space, num_samples=1, sweep_name="tiny-sweep")  # same name: restored, nothing re-run
    assert sorted(r.metrics["trial_id"] for r in again) == sorted(r.metrics["trial_id"] for r in results)
    assert len(client.search_runs([experiment_id])) == 3


def _path(checkpoint_path: str):
    from pathlib import Path

    return Path(checkpoint_path)
