"""Honest registry: the exported weights match the version's metrics, registering is idempotent, bad files refused."""

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from test_registry import write_checkpoint, write_ema_checkpoint

from arm_platform import registry
from arm_platform.train.checkpoint import CheckpointError, write_manifest


@pytest.fixture()
def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="module")
def sample() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _same_logits(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_ema_checkpoint_exports_the_weights_whose_metrics_won(tmp_path, sqlite_uri, sample):
    """Raw top-1 higher: model.pt = state.pt["model"]; EMA higher: model.pt = the EMA copy. Tags name both sets."""
    raw, ema = write_ema_checkpoint(tmp_path / "ck")
    ck = str(tmp_path / "ck")
    metrics = {"val_acc1": 15.2, "val_ema_acc1": 7.4, "val_acc5": 50.0, "val_ema_acc5": 40.0}
    v1 = registry.register_checkpoint(ck, "arm-tiny", metrics=metrics, tracking_uri=sqlite_uri)
    assert v1.tags["weights"] == "raw" and float(v1.tags["exported_acc1"]) == 15.2
    assert float(v1.tags["exported_acc5"]) == 50.0 and float(v1.tags["val_ema_acc1"]) == 7.4
    assert _same_logits(registry.load_model("models:/arm-tiny/1", tracking_uri=sqlite_uri), raw, sample)
    assert not _same_logits(raw, ema, sample)

    flipped = {"val_acc1": 7.4, "val_ema_acc1": 15.2}
    v2 = registry.register_checkpoint(ck, "arm-tiny", metrics=flipped, tracking_uri=sqlite_uri)
    assert (int(v2.version), v2.tags["weights"], float(v2.tags["exported_acc1"])) == (2, "ema", 15.2)
    pulled = registry.pull("models:/arm-tiny/2", tmp_path / "pulled", tracking_uri=sqlite_uri)
    assert (pulled / "model.pt").read_bytes() == (tmp_path / "ck" / "model.pt").read_bytes()
    assert _same_logits(registry.load_model("models:/arm-tiny@champion", tracking_uri=sqlite_uri), ema, sample)
    forced = registry.register_checkpoint(ck, "arm-tiny", metrics=flipped, weights="raw", tracking_uri=sqlite_uri)
    assert (int(forced.version), forced.tags["weights"]) == (1, "raw")  # the raw weights were version 1 already


def test_registering_the_same_checkpoint_again_returns_its_version(tmp_path, sqlite_uri):
    """Same checkpoint + same exported model.pt -> the existing version; aliases move to it; no new run or files."""
    write_checkpoint(tmp_path / "ck1")
    write_checkpoint(tmp_path / "ck2", seed=1)
    first = registry.register_checkpoint(str(tmp_path / "ck1"), "m", metrics={"val_acc1": 1.0}, tracking_uri=sqlite_uri)
    registry.register_checkpoint(str(tmp_path / "ck2"), "m", tracking_uri=sqlite_uri)
    again = registry.register_checkpoint(
        str(tmp_path / "ck1"), "m", aliases=("champion", "prod"), tracking_uri=sqlite_uri
    )
    assert (int(first.version), int(again.version)) == (1, 1) and sorted(again.aliases) == ["champion", "prod"]
    assert int(registry.resolve("models:/m@champion", sqlite_uri).version) == 1
    client = MlflowClient(sqlite_uri)
    assert len(client.search_model_versions("name='m'")) == 2
    assert len(client.search_runs([client.get_experiment_by_name(registry.REGISTRATION_EXPERIMENT).experiment_id])) == 2
    assert again.tags[registry.SHA_TAG] == first.tags[registry.SHA_TAG] and len(first.tags[registry.SHA_TAG]) == 64


@pytest.mark.parametrize(
    "payload",
    [{"model": {"w": torch.zeros(2)}}, [torch.zeros(2)], {"w": 1.0}, {}],
    ids=["nested", "list", "float", "empty"],
)
def test_model_pt_that_is_not_a_flat_tensor_state_dict_is_refused(tmp_path, sqlite_uri, payload):
    write_checkpoint(tmp_path / "ck")
    torch.save(payload, tmp_path / "ck" / "model.pt")
    write_manifest(tmp_path / "ck")  # an intact checkpoint whose model.pt is simply the wrong thing
    with pytest.raises(ValueError, match=f"model.pt of {tmp_path / 'ck'} is not a (flat )?state dict"):
        registry.register_checkpoint(str(tmp_path / "ck"), "arm-tiny", tracking_uri=sqlite_uri)


def test_pull_refuses_a_stored_model_pt_that_is_not_a_state_dict(tmp_path, sqlite_uri):
    """A version whose stored model.pt was replaced (by anything but a flat tensor dict) fails naming the model URI."""
    write_checkpoint(tmp_path / "ck")
    version = registry.register_checkpoint(str(tmp_path / "ck"), "arm-tiny", tracking_uri=sqlite_uri)
    stored = Path(version.source.removeprefix("file://")) / "model.pt"
    stored.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(ValueError, match=r"model.pt of models:/arm-tiny@champion \(version 1, .*\) cannot be loaded"):
        registry.pull("models:/arm-tiny@champion", tmp_path / "pulled", tracking_uri=sqlite_uri)
    torch.save({"net": {"w": torch.zeros(1)}}, stored)
    with pytest.raises(ValueError, match="is not a flat state dict: entry 'net' holds dict"):
        registry.load_model("models:/arm-tiny/1", tracking_uri=sqlite_uri)
    assert not (tmp_path / "pulled" / "model.pt").exists()


def test_checkpoint_without_a_valid_manifest_is_refused_naming_the_file(tmp_path, sqlite_uri):
    write_checkpoint(tmp_path / "ck")
    data = bytearray((tmp_path / "ck" / "model.pt").read_bytes())
    data[-100] ^= 0xFF  # same size, other bytes: only the sha256 tells
    (tmp_path / "ck" / "model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'ck' / 'model.pt'} does not match its sha256"):
        registry.register_checkpoint(str(tmp_path / "ck"), "arm-tiny", tracking_uri=sqlite_uri)
    (tmp_path / "ck" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'ck'} has no manifest.json"):
        registry.register_checkpoint(str(tmp_path / "ck"), "arm-tiny", tracking_uri=sqlite_uri)
    assert registry.connect(sqlite_uri).search_registered_models() == []


def test_pull_job_prints_the_exported_weights_or_one_error_line(tmp_path, sqlite_uri, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pull_job", Path(__file__).parents[1] / "jobs" / "pull_checkpoint.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    write_ema_checkpoint(tmp_path / "ck")
    metrics = {"val_acc1": 12.5, "val_ema_acc1": 25.0}
    registry.register_checkpoint(str(tmp_path / "ck"), "arm-tiny", metrics=metrics, tracking_uri=sqlite_uri)
    args = ["--dst", str(tmp_path / "pulled"), "--tracking-uri", sqlite_uri]
    assert job.main(["models:/arm-tiny@champion", *args]) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary.startswith("ARMClassifier arm_tiny_pz4") and summary.endswith("ema weights, top-1 25")
    assert job.main(["models:/arm-tiny@nope", *args]) == 1
    error = capsys.readouterr().err.strip()
    assert error == "pull_checkpoint: model 'arm-tiny' has no alias 'nope'; its aliases: @champion -> v1"
