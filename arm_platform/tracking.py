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

log = logging.getLogger(__name__)

RUN_NAME_TAG = "arm.run_name"
MIN_VIS_SIZE = 128
"""Image grids upscale smaller images (e.g. 32 px) to at least this many pixels per side."""
_SECRET_MARKERS = ("secret", "password", "token", "access_key", "aws_")


def default_tracking_uri(storage_path: str) -> str | None:
    """$MLFLOW_TRACKING_URI, else sqlite:///<abs storage_path>/mlflow.db for local storage, else None (MLflow's)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if "://" in storage_path:
        return None
    root = Path(storage_path).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def default_artifact_location(storage_path: str) -> str | None:
    """<abs storage_path>/mlartifacts for local storage (else the tracking server's default)."""
    if "://" in storage_path:
        return None
    return (Path(storage_path).expanduser().resolve() / "mlartifacts").as_uri()


def safe_params(params: dict[str, Any]) -> dict[str, Any]:
    """Drop anything that looks like a credential (never log secrets)."""
    return {k: v for k, v in params.items() if not any(m in k.lower() for m in _SECRET_MARKERS)}


class NullTracker:
    """Tracker interface with every method a no-op (non-zero ranks, tracking disabled)."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_images(self, pred: torch.Tensor, true: torch.Tensor, name: str) -> None: ...

    def set_tag(self, key: str, value: str) -> None: ...

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
        log.info("MLflow run %s (%s) at %s", self.run_id, "resumed" if existing else "new", mlflow.get_tracking_uri())

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_images(self, pred: torch.Tensor, true: torch.Tensor, name: str) -> None:
        """pred / true: (B, C, H, W) in [0, 1]; logs a PNG grid (row pairs: true over predicted)."""
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
        self._mlflow.set_tag(key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


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
