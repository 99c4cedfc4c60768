"""Registered versions are MLflow Models: `mlflow.pyfunc.load_model` and `mlflow models serve` give the checkpoint's
logits (local artifacts, and artifacts on moto S3)."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from test_registry import _free_port, _stop_group, _wait_http, write_checkpoint
from tiny import TINY

import arm_platform
from arm_platform import models, recipes, registry, storage
from arm_platform.config import apply_overrides
from arm_platform.train.checkpoint import write_manifest

MODEL_URI = "models:/arm-tiny@champion"


@pytest.fixture(scope="module")
def sample() -> torch.Tensor:
    """3 normalised images (3, 3, 32, 32): the tiny classifier's input geometry."""
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture()
def sqlite_uri(tmp_path, monkeypatch):
    """A fresh sqlite store, also MLflow's default here (`mlflow.pyfunc.load_model` reads $MLFLOW_TRACKING_URI, unless
    an earlier test in this process set MLflow's global tracking / registry URI: those are pointed here too)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def _register(tmp_path: Path, uri: str, s3_bucket: str | None = None):
    """Register a tiny finetune checkpoint as arm-tiny@champion: a local folder, or with s3_bucket the checkpoint and
    the registration run's artifacts on S3."""
    write_checkpoint(tmp_path / "ck")
    source = str(tmp_path / "ck")
    if s3_bucket is not None:
        source = f"s3://{s3_bucket}/{tmp_path.name}/ck"
        for name in ("model.pt", "config.json", "state.pt", "manifest.json"):
            storage.write_bytes_atomic(f"{source}/{name}", (tmp_path / "ck" / name).read_bytes())
        artifacts = f"s3://{s3_bucket}/{tmp_path.name}/mlflow"
        MlflowClient(uri).create_experiment(registry.REGISTRATION_EXPERIMENT, artifact_location=artifacts)
    return registry.register_checkpoint(source, "arm-tiny", metrics={"val_acc1": 50.0}, tracking_uri=uri)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_pyfunc_gives_the_logits_of_registry_load_model(tmp_path, sqlite_uri, sample, where, request):
    """pyfunc logits == registry.load_model logits; signature, input example and pinned requirements are logged."""
    bucket = request.getfixturevalue("s3_bucket") if where == "s3" else None
    version = _register(tmp_path, sqlite_uri, bucket)
    assert version.tags[registry.FLAVOR_TAG] == "python_function" and version.tags["weights"] == "raw"
    assert version.source.startswith(f"s3://{bucket}/" if bucket else tmp_path.as_uri())
    if bucket is None:  # idempotent: the same checkpoint and weights give the same version
        again = registry.register_checkpoint(str(tmp_path / "ck"), "arm-tiny", tracking_uri=sqlite_uri)
        assert int(again.version) == int(version.version)

    pyfunc = mlflow.pyfunc.load_model(MODEL_URI)
    logits = pyfunc.predict(sample.numpy())
    reference = registry.load_model(MODEL_URI, tracking_uri=sqlite_uri)
    with torch.no_grad():
        expected = reference(sample)
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-5)
    probabilities = pyfunc.predict(sample.numpy(), params={"probabilities": True})
    assert torch.allclose(torch.from_numpy(probabilities), expected.softmax(-1), atol=1e-6)

    signature = pyfunc.metadata.signature
    (images,), (out,) = signature.inputs.inputs, signature.outputs.inputs
    assert (images.type, images.shape) == (np.dtype(np.float32), (-1, 3, 32, 32))
    assert (out.type, out.shape) == (np.dtype(np.float32), (-1, 10))
    example = pyfunc.input_example
    assert example.shape == (2, 3, 32, 32) and example.dtype == np.float32
    assert pyfunc.predict(example).shape == (2, 10)
    with pytest.raises(MlflowException, match="Shape of input"):
        pyfunc.predict(np.zeros((1, 3, 16, 16), dtype=np.float32))  # not the model's geometry: refused
    requirements = Path(mlflow.pyfunc.get_model_dependencies(MODEL_URI)).read_text().splitlines()
    assert f"arm-platform=={arm_platform.__version__}" in requirements
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_checkpoints_top1(tmp_path, sqlite_uri, sample):
    """`mlflow models serve --env-manager local` on the registered version: POST /invocations -> the same top-1."""
    _register(tmp_path, sqlite_uri)
    port = _free_port()
    args = f"models serve -m {MODEL_URI} --env-manager local -p {port} -h 127.0.0.1"
    log_path = tmp_path / "serve.log"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # MLflow runs `uvicorn` from PATH
    with log_path.open("w") as log:
        proc = subprocess.Popen(  # own process group: the CLI starts a uvicorn child, stopped with it
            [sys.executable, "-m", "mlflow", *args.split()],
            env={**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri, "PATH": path},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            try:
                _wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout_s=300)  # failure bound, not a wait
            except (RuntimeError, TimeoutError) as err:
                raise AssertionError(f"{err}\n{log_path.read_text()[-3000:]}") from err
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps({"inputs": sample.tolist()}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = json.loads(response.read())
        finally:
            _stop_group(proc)
    served = torch.tensor(answer["predictions"])
    with torch.no_grad():
        expected = registry.load_model(MODEL_URI, tracking_uri=sqlite_uri)(sample)
    assert served.shape == (3, 10)
    assert served.argmax(-1).tolist() == expected.argmax(-1).tolist()
    assert torch.allclose(served, expected, atol=1e-4)


def test_pretraining_checkpoint_is_registered_without_an_mlflow_model(tmp_path, sqlite_uri):
    """A pretraining model has no classes: its version is the plain model/ folder (no flavor tag), pull still works."""
    cfg = apply_overrides(recipes.get("pretrain_tiny"), TINY)
    (tmp_path / "ck").mkdir()
    torch.save(models.build_model(cfg.model, "pretrain").state_dict(), tmp_path / "ck" / "model.pt")
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg.to_dict()))
    write_manifest(tmp_path / "ck")
    version = registry.register_checkpoint(str(tmp_path / "ck"), "arm-tiny-pt", tracking_uri=sqlite_uri)
    assert registry.FLAVOR_TAG not in version.tags and version.source.endswith(f"/{registry.ARTIFACT_PATH}/ck-raw")
    again = registry.register_checkpoint(str(tmp_path / "ck"), "arm-tiny-pt", tracking_uri=sqlite_uri)
    assert int(again.version) == int(version.version)
    pulled = registry.pull("models:/arm-tiny-pt@champion", tmp_path / "pulled", tracking_uri=sqlite_uri)
    assert (pulled / "model.pt").read_bytes() == (tmp_path / "ck" / "model.pt").read_bytes()
