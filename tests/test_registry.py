"""MLflow model registry: register / alias / tag / pull / load on sqlite, and over `mlflow server` with S3 artifacts."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from arm_platform import models, recipes, registry
from arm_platform.config import apply_overrides
from arm_platform.train.checkpoint import CheckpointError, write_manifest

TINY = ["model.embed_dim=32", "model.depth=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_checkpoint(directory: Path, seed: int = 0) -> torch.nn.Module:
    """A contract checkpoint dir (model.pt, config.json, state.pt, manifest.json) of a tiny finetune classifier without
    EMA; returns the model."""
    return write_ema_checkpoint(directory, seed, ema=False)[0]


def write_ema_checkpoint(directory: Path, seed: int = 0, ema: bool = True) -> tuple[torch.nn.Module, ...]:
    """Like train/checkpoint.py writes it: with EMA on, model.pt = EMA weights and state.pt["model"] = raw weights.

    Returns (raw model, EMA model) (EMA model None without EMA).
    """
    cfg = apply_overrides(recipes.get("finetune_tiny"), TINY + [f"optim.ema_decay={0.99 if ema else 'none'}"])
    torch.manual_seed(seed)
    raw = models.build_model(cfg.model, "finetune").eval()
    ema_model = models.build_model(cfg.model, "finetune").eval() if ema else None  # other random weights
    directory.mkdir(parents=True, exist_ok=True)
    deployed = ema_model if ema else raw
    torch.save(deployed.state_dict(), directory / "model.pt")
    (directory / "config.json").write_text(json.dumps(cfg.to_dict()))
    state = {"model": raw.state_dict(), "ema": ema_model.state_dict() if ema else None, "step": 1}
    torch.save(state, directory / "state.pt")
    write_manifest(directory)
    return raw, ema_model


@pytest.fixture(scope="module")
def sample() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture()
def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_register_creates_versions_aliases_and_tags(tmp_path, sqlite_uri):
    """Two registrations give versions 1 and 2; `champion` follows the newest; tags carry recipe, metrics, source."""
    write_checkpoint(tmp_path / "ck1")
    write_checkpoint(tmp_path / "ck2", seed=1)
    v1 = registry.register_checkpoint(
        str(tmp_path / "ck1"), "arm-tiny", metrics={"val_acc1": 71.5}, tracking_uri=sqlite_uri
    )
    v2 = registry.register_checkpoint(
        str(tmp_path / "ck2"),
        "arm-tiny",
        aliases=("champion", "staging"),
        metrics={"val_acc1": 80.25},
        tags={"note": "second"},
        tracking_uri=sqlite_uri,
    )
    assert (int(v1.version), int(v2.version)) == (1, 2)
    assert int(registry.resolve("models:/arm-tiny@champion", sqlite_uri).version) == 2
    assert int(registry.resolve("models:/arm-tiny@staging", sqlite_uri).version) == 2
    assert int(registry.resolve("models:/arm-tiny/1", sqlite_uri).version) == 1
    assert int(registry.resolve("models:/arm-tiny", sqlite_uri).version) == 2
    tags = v2.tags
    assert tags["recipe"] == "finetune_tiny" and tags["timm_model"] == "arm_tiny_pz4" and tags["task"] == "finetune"
    assert float(tags["val_acc1"]) == 80.25 and tags["note"] == "second"
    assert tags["weights"] == "raw" and float(tags["exported_acc1"]) == 80.25  # no EMA: model.pt is the raw model
    assert tags[registry.CHECKPOINT_URI_TAG] == str(tmp_path / "ck2")
    assert len(tags["source_run_id"]) == 32 and v2.run_id == tags["source_run_id"]
    assert v2.source.startswith(tmp_path.as_uri())  # artifacts next to the sqlite db, not under the cwd


def test_pull_and_load_reproduce_the_checkpoint(tmp_path, sqlite_uri, sample):
    """pull copies model.pt/config.json byte for byte; load_model gives the same logits as the saved model."""
    model = write_checkpoint(tmp_path / "ck")
    registry.register_checkpoint(str(tmp_path / "ck"), "arm-tiny", tracking_uri=sqlite_uri)
    pulled = registry.pull("models:/arm-tiny@champion", tmp_path / "pulled", tracking_uri=sqlite_uri)
    assert sorted(p.name for p in pulled.iterdir()) == ["config.json", "model.pt"]
    for name in ("config.json", "model.pt"):
        assert (pulled / name).read_bytes() == (tmp_path / "ck" / name).read_bytes()
    loaded = registry.load_model("models:/arm-tiny/1", tracking_uri=sqlite_uri)
    assert type(loaded).__name__ == "ARMClassifier" and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample), model(sample), rtol=0, atol=0)


def test_register_from_run_id_uses_its_checkpoint_tag_and_metrics(tmp_path, sqlite_uri):
    """A run id source: files come from the run's checkpoint_uri tag, metrics from the run, logged into that run."""
    from mlflow.tracking import MlflowClient

    write_checkpoint(tmp_path / "ck")
    client = MlflowClient(sqlite_uri)
    experiment_id = client.create_experiment("runs", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(experiment_id, tags={registry.CHECKPOINT_URI_TAG: str(tmp_path / "ck")})
    client.log_metric(run.info.run_id, "val_acc1", 64.0)
    version = registry.register_checkpoint(run.info.run_id, "from-run", tracking_uri=sqlite_uri)
    assert version.run_id == run.info.run_id and float(version.tags["val_acc1"]) == 64.0
    logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, f"{registry.ARTIFACT_PATH}/ck-raw")}
    assert logged == {"model.pt", "config.json"}


def test_unknown_model_alias_and_version_errors_list_what_exists(tmp_path, sqlite_uri):
    write_checkpoint(tmp_path / "ck")
    registry.register_checkpoint(
        str(tmp_path / "ck"), "arm-tiny", aliases=("champion", "prod"), tracking_uri=sqlite_uri
    )
    with pytest.raises(ValueError, match=r"no alias 'nope'; its aliases: @champion -> v1, @prod -> v1"):
        registry.pull("models:/arm-tiny@nope", tmp_path / "x", tracking_uri=sqlite_uri)
    with pytest.raises(ValueError, match=r"no registered model 'arm-huge'.*registered models: arm-tiny"):
        registry.load_model("models:/arm-huge@champion", tracking_uri=sqlite_uri)
    with pytest.raises(ValueError, match=r"no version 7; versions: \[1\]"):
        registry.resolve("models:/arm-tiny/7", sqlite_uri)
    with pytest.raises(ValueError, match="is not models:/NAME@ALIAS"):
        registry.resolve("runs:/abc/model", sqlite_uri)


def test_checkpoint_without_model_pt_is_rejected(tmp_path, sqlite_uri):
    write_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "model.pt").unlink()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'ck' / 'model.pt'} is missing"):
        registry.register_checkpoint(str(tmp_path / "ck"), "arm-tiny", tracking_uri=sqlite_uri)


def test_unreachable_registry_fails_fast_naming_the_uri(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"MLflow registry at {uri} is unreachable"):
        registry.load_model("models:/arm-tiny@champion", tracking_uri=uri)
    with pytest.raises(ConnectionError, match="unreachable"):
        registry.register_checkpoint(str(tmp_path), "arm-tiny", tracking_uri=uri)
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------------------------------------- mlflow server + S3


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode} (see mlflow-server.log)")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout_s} s")


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group started for `proc`, SIGKILL it after 15 s."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture()
def s3_env(monkeypatch):
    """moto S3 on loopback (in-process thread) with a bucket; AWS_* env pointing at it (dummy credentials)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="arm")
    yield env
    server.stop()


@pytest.fixture()
def mlflow_server(tmp_path, s3_env):
    """`mlflow server --workers 1` on loopback, sqlite backend, artifacts proxied to s3://arm/mlflow on moto."""
    port = _free_port()
    args = f"server --workers 1 --host 127.0.0.1 --port {port} --backend-store-uri sqlite:///{tmp_path}/server.db"
    args += " --serve-artifacts --artifacts-destination s3://arm/mlflow"
    cmd = [sys.executable, "-m", "mlflow", *args.split()]
    log = (tmp_path / "mlflow-server.log").open("w")
    proc = subprocess.Popen(  # own process group: the CLI forks a uvicorn child, stopped with it
        cmd, env={**os.environ, **s3_env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", proc, timeout_s=240)  # slow start on a loaded 2-core box
        yield uri
    finally:
        _stop_group(proc)
        log.close()


@pytest.mark.slow
def test_registry_over_http_server_with_s3_artifacts(tmp_path, mlflow_server, s3_env, sample):
    """Register an s3:// checkpoint through the server, then pull + load it: same logits, files stored in S3."""
    import boto3

    from arm_platform import storage

    model = write_checkpoint(tmp_path / "ck")
    for name in ("model.pt", "config.json", "state.pt", "manifest.json"):
        storage.write_bytes_atomic(f"s3://arm/runs/ck/{name}", (tmp_path / "ck" / name).read_bytes())
    version = registry.register_checkpoint(
        "s3://arm/runs/ck", "arm-tiny", metrics={"val_acc1": 55.0}, tracking_uri=mlflow_server
    )
    assert int(version.version) == 1 and version.tags[registry.CHECKPOINT_URI_TAG] == "s3://arm/runs/ck"
    assert version.source.startswith("mlflow-artifacts:/")
    keys = [
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
        .list_objects_v2(Bucket="arm", Prefix="mlflow/")
        .get("Contents", [])
    ]
    assert sorted(Path(k).name for k in keys if f"/{registry.ARTIFACT_PATH}/" in k) == ["config.json", "model.pt"]
    loaded = registry.load_model("models:/arm-tiny@champion", dst_dir=tmp_path / "pulled", tracking_uri=mlflow_server)
    assert (tmp_path / "pulled" / "model.pt").read_bytes() == (tmp_path / "ck" / "model.pt").read_bytes()
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample), model(sample), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no alias 'missing'; its aliases: @champion -> v1"):
        registry.resolve("models:/arm-tiny@missing", mlflow_server)
