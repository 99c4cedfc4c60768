"""Planted secrets never reach what the platform writes: log lines, the MLflow store (params, tags), the run record
(`arm_run.json`), checkpoints (`config.json`) or the --dry-run output. The secrets ride in a tracking URI with a
password and a query token, and in an AWS key id inside a checkpoint URI tag."""

import dataclasses
import logging

import pytest

from arm_platform import launch, recipes
from arm_platform.config import apply_overrides, flatten
from arm_platform.tracking import MlflowTracker
from arm_platform.train.checkpoint import save_checkpoint

PASSWORD, TOKEN, KEY_ID = "S3cr3tPassw0rd", "T0kenXYZ123", "AKIAABCDEFGHIJKLMNOP"
URI = f"http://alice:{PASSWORD}@mlflow.internal:5000/?token={TOKEN}"


def _planted_cfg(storage):
    cfg = apply_overrides(recipes.get("finetune_tiny"), {"tracking.tracking_uri": URI})
    return dataclasses.replace(cfg, storage_path=str(storage))


def _leaks(text: str) -> list[str]:
    return [s for s in (PASSWORD, TOKEN, KEY_ID) if s in text]


def test_no_planted_secret_reaches_logs_mlflow_run_records_or_checkpoints(tmp_path, caplog, capsys, monkeypatch):
    from arm_platform.models import build_model
    from arm_platform.security import install_log_redaction

    caplog.set_level(logging.INFO)
    install_log_redaction()
    cfg = _planted_cfg(tmp_path / "runs")
    plan = launch.Plan(cfg, None, 1, 1, "0123456789", "planted", str(tmp_path / "runs"))
    launch.write_run_record(plan, finished=False)  # arm_run.json
    model = build_model(cfg.model, "finetune")
    save_checkpoint(  # config.json, which registering uploads
        tmp_path / "runs" / "planted" / "checkpoint_000000001",
        model=model,
        optimizer=__import__("torch").optim.SGD(model.parameters(), lr=0.1),
        step=1,
        epoch=0,
        config=cfg.to_dict(),
    )
    tracker = MlflowTracker(  # the real store is sqlite; the planted URI rides in the params
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="e",
        run_name="planted",
        params={**flatten(cfg), "env.AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI"},
        system_metrics=False,
        artifact_location=(tmp_path / "art").as_uri(),
    )
    tracker.set_tag("checkpoint.latest", f"s3://bucket/{KEY_ID}/ck?X-Amz-Signature={TOKEN}")
    tracker.finish()
    logging.getLogger("arm_platform.launch").info("tracking at %s", URI)  # any log line, any logger
    launch.fit(cfg, ["--dry-run"])  # prints the resolved config

    written = {p: p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()}
    assert any(p.name == "arm_run.json" for p in written) and any(p.name == "config.json" for p in written)
    leaks = {str(p): _leaks(text) for p, text in written.items() if _leaks(text)}
    assert leaks == {}
    assert "wJalrXUtnFEMI" not in written[tmp_path / "mlflow.db"]
    assert _leaks(caplog.text) == [] and "alice:***@mlflow.internal" in caplog.text
    out = capsys.readouterr().out
    assert _leaks(out) == [] and '"tracking_uri": "http://alice:***@mlflow.internal:5000/?token=***"' in out


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "..", ".hidden", "runs/x"])
def test_run_names_that_escape_storage_fail_before_ray(name, tmp_path):
    import ray

    with pytest.raises(ValueError, match="experiment_name"):
        launch.fit(recipes.get("pretrain_tiny"), ["--output_dir", str(tmp_path), "--experiment_name", name])
    assert not ray.is_initialized() and list(tmp_path.iterdir()) == []
