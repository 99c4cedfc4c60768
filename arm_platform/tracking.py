"""Experiment tracking: MLflow on world rank 0 only, `NullTracker` (same methods, no-ops) everywhere else.

Logs the whole flattened recipe as params (plus the ops backend), per-step loss / lr / img_per_s, epoch metrics,
system metrics (when psutil is installed), predicted-vs-true image grids (PNG artifacts) and checkpoint URIs (tags).
Reference: nanochat `DummyWandb` for the null object.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from arm_platform.security import is_secret_key, redact, redact_text

log = logging.getLogger(__name__)

RUN_NAME_TAG = "arm.run_name"
MIN_VIS_SIZE = 128
"""Image grids upscale smaller images (e.g. 32 px) to at least this many pixels per side."""
_SECRET_MARKERS = ("secret", "password", "token", "access_key", "aws_")


def default_tracking_uri(storage_path: str) -> str:
    """$MLFLOW_TRACKING_URI, else sqlite:///<abs storage_path>/mlflow.db for local storage.

    Raises:
        ValueError: remote storage (s3://...) and no tracking URI: MLflow's own default is a sqlite file in the
            job's working directory, which a cluster job deletes when it ends, so the runs would be lost.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if "://" in storage_path:
        raise ValueError(
            f"storage {storage_path} is remote but no MLflow tracking URI is set: runs would land in a sqlite file in "
            "the job's temporary working directory and be lost. Set MLFLOW_TRACKING_URI (e.g. http://mlflow:5000) "
            "or tracking.tracking_uri=..."
        )
    root = Path(storage_path).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def default_artifact_location(storage_path: str) -> str | None:
    """Artifacts beside the runs: <abs storage_path>/mlartifacts (file URI, or s3:// for S3 storage), else None.

    Used with sqlite stores (a tracking server decides its own artifact root).
    """
    if storage_path.startswith("s3://"):
        return f"{storage_path.rstrip('/')}/mlartifacts"
    if "://" in storage_path:
        return None
    return (Path(storage_path).expanduser().resolve() / "mlartifacts").as_uri()


def safe_params(params: dict[str, Any]) -> dict[str, Any]:
    """Drop credential-like keys and mask credentials inside values (URIs with user:pass@, ?token=...)."""
    kept = {
        k: v
        for k, v in params.items()
        if not any(m in k.lower() for m in _SECRET_MARKERS) and not is_secret_key(k.rsplit(".", 1)[-1])
    }
    return redact(kept)


class NullTracker:
    """Tracker interface with every method a no-op (non-zero ranks, tracking disabled)."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_images(self, pred: torch.Tensor, true: torch.Tensor, name: str) -> None: ...

    def set_tag(self, key: str, value: str) -> None: ...

    def prune_checkpoint_tags(self, existing: set[str]) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run per Ray run name; a restarted / resumed run re-attaches to it (tag `arm.run_name`)."""

    def __init__(
        self,
        *,
        tracking_uri: str | None,
        experiment: str,
        run_name: str,
        params: dict[str, Any],
        system_metrics: bool = True,
        artifact_location: str | None = None,
    ) -> None:
        import mlflow

        self._mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        if artifact_location and mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=artifact_location)
        mlflow.set_experiment(experiment)
        existing = mlflow.search_runs(
            filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1, output_format="list"
        )
        system_metrics = system_metrics and importlib.util.find_spec("psutil") is not None
        run = mlflow.start_run(
            run_id=existing[0].info.run_id if existing else None,
            run_name=None if existing else run_name,
            log_system_metrics=system_metrics,
        )
        self.run_id = run.info.run_id
        mlflow.set_tag(RUN_NAME_TAG, run_name)
        if not existing:
            mlflow.log_params({k: str(v) for k, v in safe_params(params).items()})
        where = redact_text(mlflow.get_tracking_uri())
        log.info("MLflow run %s (%s) at %s", self.run_id, "resumed" if existing else "new", where)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_images(self, pred: torch.Tensor, true: torch.Tensor, name: str) -> None:
        """pred: (B, C, H, W), true: (k*B, C, H, W), in [0, 1]; logs a PNG grid with B columns: the k rows of `true`
        above the predicted row (pretraining passes k=2: the input, then the norm-pix target drawn with the same
        batch-level statistics as the prediction, see `ARMPretrain.predict_images`)."""
        from torchvision.utils import make_grid, save_image

        nrow = pred.shape[0]
        scale = max(1, MIN_VIS_SIZE // pred.shape[-1])  # nearest upscaling keeps small images inspectable
        pred, true = (torch.nn.functional.interpolate(t, scale_factor=scale, mode="nearest") for t in (pred, true))
        grid = make_grid(torch.cat([true, pred]).clamp(0, 1), nrow=nrow, padding=2)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.png"
            save_image(grid, path)
            self._mlflow.log_artifact(str(path), artifact_path="predictions")

    def set_tag(self, key: str, value: str) -> None:
        self._mlflow.set_tag(key, redact_text(str(value)))

    def prune_checkpoint_tags(self, existing: set[str]) -> None:
        """Delete `checkpoint.step_*` tags whose checkpoint URI is not in `existing` (pruned by num_to_keep)."""
        prune_checkpoint_tags(self._mlflow.MlflowClient(), self.run_id, existing)

    def finish(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


CHECKPOINT_TAG_PREFIX = "checkpoint.step_"


def prune_checkpoint_tags(client: Any, run_id: str, existing: set[str]) -> list[str]:
    """Delete the run's `checkpoint.step_*` tags that name a checkpoint URI not in `existing`; returns their keys."""
    tags = client.get_run(run_id).data.tags
    gone = [k for k, v in tags.items() if k.startswith(CHECKPOINT_TAG_PREFIX) and v not in existing]
    for key in gone:
        client.delete_tag(run_id, key)
    return gone


def run_id_for(client: Any, run_name: str) -> str | None:
    """MLflow run id of the Ray run `run_name` (tag `arm.run_name`) in any experiment, None when absent."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    return found[0].info.run_id if found else None


def build_tracker(
    *,
    rank: int,
    tracking_uri: str | None,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    system_metrics: bool = True,
    artifact_location: str | None = None,
) -> NullTracker:
    """MlflowTracker on world rank 0, NullTracker elsewhere."""
    if rank != 0:
        return NullTracker()
    return MlflowTracker(
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=run_name,
        params=params,
        system_metrics=system_metrics,
        artifact_location=artifact_location,
    )
