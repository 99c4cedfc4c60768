"""MLflow model registry: register a training checkpoint, pull it back, load it as a ready timm model.

A registered version holds the checkpoint's `model.pt` (plain state_dict) and `config.json` (TrainConfig.to_dict())
under the artifact path `model/<checkpoint dir name>` of its source MLflow run (or of a new registration run).
Version tags name the recipe, the timm model, the metrics, the source run and the storage URI of the full checkpoint
(with `state.pt`). Works with any MLflow tracking store: local sqlite, or `mlflow server` over HTTP with S3 artifacts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

import mlflow
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from arm_platform.config import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_FILES = ("model.pt", "config.json")
"""What a registered version holds (the contract's checkpoint dir minus the training state)."""
ARTIFACT_PATH = "model"
"""Run artifact folder of registered files: `model/<checkpoint dir name>/` (or `model/` a run logged itself)."""
CHECKPOINT_URI_TAG = "checkpoint_uri"
"""Run / version tag: storage URI of the full checkpoint dir (model.pt, config.json, state.pt)."""
REGISTRATION_EXPERIMENT = "model-registry"
"""Experiment of the registration runs created when no source run is given."""
PROBE_TIMEOUT_S = 5.0
METRIC_PREFIXES = ("val_", "knn_")
"""Run metrics copied to version tags when registering from a run (evaluation results, not loss / lr curves)."""

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))?/?$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The explicit URI, else $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///./mlflow.db)."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def connect(tracking_uri: str | None = None) -> MlflowClient:
    """MlflowClient on one URI used for both tracking and registry; ConnectionError fast if a server is down.

    HTTP stores are probed once on `/health` with a short timeout instead of MLflow's minutes of retries.
    """
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        _probe_http(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _probe_http(uri: str) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:  # noqa: S310 (http(s) only)
            if response.status != 200:
                raise ConnectionError(f"MLflow registry at {uri} answered HTTP {response.status} on /health")
    except (urllib.error.URLError, OSError) as err:
        raise ConnectionError(
            f"MLflow registry at {uri} is unreachable ({err}); start the server or fix MLFLOW_TRACKING_URI"
        ) from err


# --------------------------------------------------------------------------------------------------------------------
# register


def register_checkpoint(
    source: str,
    name: str,
    *,
    aliases: Iterable[str] = ("champion",),
    tags: Mapping[str, object] | None = None,
    metrics: Mapping[str, float] | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> ModelVersion:
    """Register a checkpoint as a new version of model `name` and point `aliases` at it.

    Args:
        source: checkpoint dir (local path or s3:// URI holding model.pt + config.json), or an MLflow run id whose
            run carries a `checkpoint_uri` tag or already logged `model/model.pt`.
        run_id: MLflow run the checkpoint came from (e.g. a Tune trial's run); the files are logged there.
            None with a dir `source`: a new run in experiment "model-registry".
        metrics: recorded as version tags (e.g. {"val_acc1": 81.2}); with a run id, the run's latest val_* / knn_*
            metrics are the default.
        tags: extra version tags.
    Returns:
        The new ModelVersion (its `.version` is the number; `models:/NAME/<version>` loads it).
    """
    client = connect(tracking_uri)
    if _RUN_ID.match(source) and not Path(source).exists():
        run_id, checkpoint_uri = source, _checkpoint_uri_of_run(client, source)
    else:
        checkpoint_uri = source
    run_metrics = client.get_run(run_id).data.metrics if run_id else {}
    run_metrics = {k: v for k, v in run_metrics.items() if k.startswith(METRIC_PREFIXES)}
    with tempfile.TemporaryDirectory(prefix="arm-register-") as tmp:
        if checkpoint_uri is not None:
            _copy_checkpoint_files(checkpoint_uri, Path(tmp))
        else:  # the run already holds the files
            client.download_artifacts(run_id, ARTIFACT_PATH, tmp)
            shutil.copytree(Path(tmp) / ARTIFACT_PATH, tmp, dirs_exist_ok=True)
        cfg = _read_config(Path(tmp) / "config.json")
        if run_id is None:
            run_id = _create_registration_run(client, name, checkpoint_uri)
        artifact_path = ARTIFACT_PATH
        if checkpoint_uri is not None:  # one folder per checkpoint: earlier versions of this run keep their files
            artifact_path = f"{ARTIFACT_PATH}/{checkpoint_uri.rstrip('/').rsplit('/', 1)[-1]}"
            _log_files(client, run_id, Path(tmp), artifact_path)
    version_tags = _version_tags(cfg, checkpoint_uri, run_id, {**run_metrics, **(metrics or {})}, tags)
    _ensure_registered_model(client, name)
    source_uri = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(
        name,
        source=source_uri,
        run_id=run_id,
        tags=version_tags,
        description=f"{cfg.recipe} checkpoint {checkpoint_uri or run_id}",
    )
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    logger.info("registered %s version %s (aliases %s) from %s", name, version.version, list(aliases), source)
    return client.get_model_version(name, version.version)


def _log_files(client: MlflowClient, run_id: str, folder: Path, artifact_path: str) -> None:
    for filename in CHECKPOINT_FILES:
        client.log_artifact(run_id, str(folder / filename), artifact_path)


def _checkpoint_uri_of_run(client: MlflowClient, run_id: str) -> str | None:
    """The run's `checkpoint_uri` tag, or None when the run already logged model/model.pt itself."""
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ValueError(f"no MLflow run {run_id!r} in {client.tracking_uri}") from err
    if CHECKPOINT_URI_TAG in run.data.tags:
        return run.data.tags[CHECKPOINT_URI_TAG]
    logged = {Path(f.path).name for f in client.list_artifacts(run_id, ARTIFACT_PATH)}
    if set(CHECKPOINT_FILES) <= logged:
        return None
    raise ValueError(
        f"run {run_id} has no {CHECKPOINT_URI_TAG!r} tag and no logged {ARTIFACT_PATH}/model.pt; "
        "pass the checkpoint directory instead"
    )


def _copy_checkpoint_files(checkpoint_uri: str, dst: Path) -> None:
    """Copy model.pt + config.json from a local or s3:// checkpoint dir into `dst`."""
    from arm_platform import storage

    for filename in CHECKPOINT_FILES:
        uri = storage.join(checkpoint_uri, filename)
        if not storage.exists(uri):
            raise ValueError(f"checkpoint {checkpoint_uri} has no {filename} (expected {', '.join(CHECKPOINT_FILES)})")
        (dst / filename).write_bytes(storage.read_bytes(uri))


def _read_config(path: Path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path.name} is not a TrainConfig.to_dict() JSON: {err}") from err


def _create_registration_run(client: MlflowClient, name: str, checkpoint_uri: str | None) -> str:
    experiment = client.get_experiment_by_name(REGISTRATION_EXPERIMENT)
    if experiment is None:
        experiment_id = client.create_experiment(REGISTRATION_EXPERIMENT, _artifact_location(client.tracking_uri))
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=f"register-{name}", tags={CHECKPOINT_URI_TAG: checkpoint_uri or ""})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _artifact_location(tracking_uri: str) -> str | None:
    """sqlite stores keep artifacts next to the database (MLflow's default is ./mlruns under the cwd)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        return (db.parent / "mlartifacts" / REGISTRATION_EXPERIMENT).as_uri()
    return None  # a server decides (--default-artifact-root / --artifacts-destination)


def _version_tags(
    cfg: TrainConfig,
    checkpoint_uri: str | None,
    run_id: str,
    metrics: Mapping[str, float],
    extra: Mapping[str, object] | None,
) -> dict[str, str]:
    tags = {
        "recipe": cfg.recipe,
        "task": cfg.task,
        "timm_model": cfg.model.name,
        "source_run_id": run_id,
        CHECKPOINT_URI_TAG: checkpoint_uri or "",
    }
    tags.update({key: f"{float(value):.6g}" for key, value in metrics.items()})
    tags.update({key: str(value) for key, value in (extra or {}).items()})
    return tags


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="ARM (Vision Mamba) checkpoints")


# --------------------------------------------------------------------------------------------------------------------
# resolve / pull / load


def resolve(model_uri: str, tracking_uri: str | None = None) -> ModelVersion:
    """The ModelVersion behind "models:/NAME@ALIAS", "models:/NAME/VERSION" or "models:/NAME" (latest).

    Raises:
        ValueError: malformed URI, unknown model (lists the registered ones), unknown alias (lists the model's
            aliases) or unknown version (lists the versions).
        ConnectionError: the registry server is unreachable.
    """
    match = _MODEL_URI.match(model_uri)
    if match is None:
        raise ValueError(f"model URI {model_uri!r} is not models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME")
    client = connect(tracking_uri)
    name, alias, version = match["name"], match["alias"], match["version"]
    registered = _get_registered_model(client, name)
    if alias is not None:
        if alias not in registered.aliases:
            known = ", ".join(f"@{a} -> v{v}" for a, v in sorted(registered.aliases.items())) or "none"
            raise ValueError(f"model {name!r} has no alias {alias!r}; its aliases: {known}")
        return client.get_model_version_by_alias(name, alias)
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    if not versions:
        raise ValueError(f"model {name!r} has no versions")
    if version is None:
        return client.get_model_version(name, str(versions[-1]))
    if int(version) not in versions:
        raise ValueError(f"model {name!r} has no version {version}; versions: {versions}")
    return client.get_model_version(name, version)


def _get_registered_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" not in str(err.error_code):
            raise
        names = sorted(m.name for m in client.search_registered_models())
        raise ValueError(
            f"no registered model {name!r} in {client.tracking_uri}; registered models: {', '.join(names) or 'none'}"
        ) from None


def pull(model_uri: str, dst_dir: str | os.PathLike, tracking_uri: str | None = None) -> Path:
    """Download a registered version's model.pt + config.json into `dst_dir`; returns `dst_dir` as a Path.

    Files land under a temporary name first and are renamed into place, so a reader never sees a partial file.
    """
    version = resolve(model_uri, tracking_uri)
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=dst) as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=version.source, dst_path=tmp, tracking_uri=resolve_tracking_uri(tracking_uri)
            )
        )
        missing = [f for f in CHECKPOINT_FILES if not (local / f).is_file()]
        if missing:
            raise ValueError(f"{model_uri} (version {version.version}, {version.source}) lacks {missing}")
        for filename in CHECKPOINT_FILES:
            os.replace(local / filename, dst / filename)
    logger.info("pulled %s (version %s) to %s", model_uri, version.version, dst)
    return dst


def load_checkpoint_dir(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the model named in `path`/config.json (models.build_model) and load `path`/model.pt into it (eval mode)."""
    from arm_platform import models

    path = Path(path)
    cfg = _read_config(path / "config.json")
    model = models.build_model(cfg.model, cfg.task)
    state = torch.load(path / "model.pt", map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_model(
    model_uri: str,
    *,
    dst_dir: str | os.PathLike | None = None,
    map_location: str | torch.device = "cpu",
    tracking_uri: str | None = None,
) -> torch.nn.Module:
    """Pull a registered version and return the ready timm-created model with its weights, in eval mode.

    Args:
        model_uri: "models:/NAME@ALIAS", "models:/NAME/VERSION" or "models:/NAME".
        dst_dir: where to keep the pulled files; None uses a temporary folder removed afterwards.
    """
    if dst_dir is not None:
        return load_checkpoint_dir(pull(model_uri, dst_dir, tracking_uri), map_location)
    with tempfile.TemporaryDirectory(prefix="arm-pull-") as tmp:
        return load_checkpoint_dir(pull(model_uri, tmp, tracking_uri), map_location)
