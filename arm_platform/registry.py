"""MLflow model registry: register a training checkpoint, pull it back, load it as a ready timm model.

A registered version holds `model.pt` (a flat {name: tensor} state dict) and `config.json` (TrainConfig.to_dict()),
logged under the artifact path `model/<checkpoint dir name>-<weights>` of its source MLflow run (or of a new
registration run). A classifier's version is an MLflow Model (`mlflow_model`: pyfunc from code, signature, input
example, pinned requirements; tag `mlflow_flavor`) whose folder `pyfunc/<checkpoint dir name>-<weights>` is the
version's source, holding the same two files for `pull`: `mlflow.pyfunc.load_model("models:/NAME@ALIAS")` and
`mlflow models serve` take it. A pretraining checkpoint's version is the `model/...` folder.
Its metrics describe exactly the weights in its model.pt: with EMA on, a checkpoint holds two sets (`model.pt` = EMA,
`state.pt["model"]` = raw); registering exports the set whose val top-1 won (or the one asked for) and tags `weights`
(raw | ema), `exported_acc1/acc5/loss` (that set's metrics), both sets' `val_*` / `val_ema_*` metrics and
`model_sha256`. Registering the same checkpoint with the same exported weights again returns the existing version
(aliases move to it). A checkpoint folder must verify against its manifest (`train.integrity`); a model.pt that is not
a flat tensor state dict is refused at register, pull and load, naming the file or URI. Works with any MLflow
tracking store: local sqlite, or `mlflow server` over HTTP with S3 artifacts.
"""

from __future__ import annotations

import logging
import os
import re
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

from arm_platform import mlflow_model, storage
from arm_platform.config import TrainConfig
from arm_platform.train.checkpoint import check_state_dict
from arm_platform.version_files import ARTIFACT_PATH, CHECKPOINT_FILES, Weights, exported_tags, read_config, stage_files

logger = logging.getLogger(__name__)

PYFUNC_PATH, FLAVOR_TAG = "pyfunc", "mlflow_flavor"
"""Run artifact folder of the versions' MLflow Models (`pyfunc/<checkpoint dir name>/`), and the version tag naming
their flavor (python_function; absent on versions that are no MLflow Model)."""
CHECKPOINT_URI_TAG = "checkpoint_uri"
"""Run / version tag: storage URI of the full checkpoint dir (model.pt, config.json, state.pt)."""
REGISTRATION_EXPERIMENT = "model-registry"
"""Experiment of the registration runs created when no source run is given."""
PROBE_TIMEOUT_S = 5.0
METRIC_PREFIXES = ("val_", "knn_")
"""Run metrics copied to version tags when registering from a run (evaluation results, not loss / lr curves)."""
WEIGHTS_TAG, SHA_TAG = "weights", "model_sha256"
"""Version tags: which weights model.pt holds (raw | ema) and its sha256 (and `exported_acc1` etc., see
`version_files.exported_tags`)."""

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
    weights: Weights = "auto",
) -> ModelVersion:
    """Register a checkpoint as a version of model `name` and point `aliases` at it (idempotent).

    Args:
        source: checkpoint dir (local path or s3:// URI holding model.pt + config.json + manifest.json, and state.pt
            for raw weights when EMA is on), or an MLflow run id whose run carries a `checkpoint_uri` tag or already
            logged `model/model.pt`.
        run_id: MLflow run the checkpoint came from (e.g. a Tune trial's run); the files are logged there.
            None with a dir `source`: a new run in experiment "model-registry".
        metrics: recorded as version tags (e.g. {"val_acc1": 81.2, "val_ema_acc1": 80.9}); None with a run id: the
            run's latest val_* / knn_* metrics.
        weights: "auto" exports the weights whose val top-1 in `metrics` is higher (EMA on a tie; the raw model when
            only its metric is known; the checkpoint's model.pt when none is); "raw" / "ema" force one.
        tags: extra version tags.
    Returns:
        The ModelVersion (`.version` is the number; `models:/NAME/<version>` loads it). Registering the same source
        checkpoint with the same exported model.pt again returns the existing version.
    Raises:
        CheckpointError (a ValueError): the checkpoint does not verify against its manifest (names the file).
        ValueError: missing files, a model.pt that is not a flat tensor state dict, weights the checkpoint lacks.
    """
    client = connect(tracking_uri)
    if _RUN_ID.match(source) and not Path(source).exists():
        run_id, checkpoint_uri = source, _checkpoint_uri_of_run(client, source)
    else:
        checkpoint_uri = source
    if metrics is None:
        run_metrics = client.get_run(run_id).data.metrics if run_id else {}
        metrics = {k: v for k, v in run_metrics.items() if k.startswith(METRIC_PREFIXES)}
    all_metrics = dict(metrics)
    with tempfile.TemporaryDirectory(prefix="arm-register-") as tmp:
        folder = Path(tmp)
        cfg, chosen = stage_files(client, checkpoint_uri, run_id, folder, all_metrics, weights)
        sha = storage.sha256(str(folder / "model.pt"))
        flavor = mlflow_model.FLAVOR if mlflow_model.servable(cfg) else ""
        found = _find_version(client, name, checkpoint_uri or "", run_id, sha, flavor)
        if found is not None:
            return _set_aliases(client, found, aliases, f"already registered as version {found.version}")
        if run_id is None:
            run_id = _create_registration_run(client, name, checkpoint_uri)
        suffix = "" if checkpoint_uri is None else f"/{checkpoint_uri.rstrip('/').rsplit('/', 1)[-1]}-{chosen}"
        artifact_path = ARTIFACT_PATH + suffix  # one folder per checkpoint and weights: earlier versions keep theirs
        if checkpoint_uri is not None:
            _log_files(client, run_id, folder, artifact_path)
        if flavor:
            saved = mlflow_model.save(folder, cfg, folder / ".mlflow-model", CHECKPOINT_FILES)
            artifact_path = PYFUNC_PATH + suffix
            client.log_artifacts(run_id, str(saved), artifact_path)
    version_tags = _version_tags(cfg, checkpoint_uri, run_id, all_metrics, tags)
    version_tags |= {WEIGHTS_TAG: chosen, SHA_TAG: sha} | exported_tags(all_metrics, chosen)
    version_tags |= {FLAVOR_TAG: flavor} if flavor else {}
    _ensure_registered_model(client, name)
    version = client.create_model_version(
        name,
        source=f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}",
        run_id=run_id,
        tags=version_tags,
        description=f"{cfg.recipe} checkpoint {checkpoint_uri or run_id} ({chosen} weights)",
    )
    return _set_aliases(client, version, aliases, f"registered from {source} ({chosen} weights)")


def _set_aliases(client: MlflowClient, version: ModelVersion, aliases: Iterable[str], what: str) -> ModelVersion:
    aliases = list(aliases)
    for alias in aliases:
        client.set_registered_model_alias(version.name, alias, version.version)
    logger.info("%s version %s (aliases %s): %s", version.name, version.version, aliases, what)
    return client.get_model_version(version.name, version.version)


def _find_version(
    client: MlflowClient, name: str, checkpoint_uri: str, run_id: str | None, sha: str, flavor: str
) -> ModelVersion | None:
    """The version of `name` already made from this checkpoint (or run) with this exact model.pt and the same flavor
    (a version registered before versions became MLflow Models is not reused), if any."""
    for version in client.search_model_versions(f"name='{name}' and tags.{SHA_TAG} = '{sha}'"):
        same_source = version.tags.get(CHECKPOINT_URI_TAG, "") == checkpoint_uri
        same_source &= version.tags.get(FLAVOR_TAG, "") == flavor
        if same_source and (checkpoint_uri or version.tags.get("source_run_id") == run_id):
            return version
    return None


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

    Files land under a temporary name first and are renamed into place, so a reader never sees a partial file; a
    model.pt that is not a flat tensor state dict is refused (ValueError naming the model URI and version source).
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
        where = f"{model_uri} (version {version.version}, {version.source})"
        missing = [f for f in CHECKPOINT_FILES if not (local / f).is_file()]
        if missing:
            raise ValueError(f"{where} lacks {missing}")
        check_state_dict(local / "model.pt", f"model.pt of {where}")
        for filename in CHECKPOINT_FILES:
            os.replace(local / filename, dst / filename)
    logger.info("pulled %s (version %s) to %s", model_uri, version.version, dst)
    return dst


def load_checkpoint_dir(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the model named in `path`/config.json (models.build_model) and load `path`/model.pt into it (eval mode)."""
    from arm_platform import models

    path = Path(path)
    cfg = read_config(path / "config.json")
    model = models.build_model(cfg.model, cfg.task)
    model.load_state_dict(check_state_dict(path / "model.pt", str(path / "model.pt"), map_location))
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
