"""What a registered version holds: model.pt (the weights it exports, raw or EMA) and config.json, staged from a
checkpoint folder or from a run that logged them, checked, into a local folder (see `registry.register_checkpoint`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from mlflow.tracking import MlflowClient

from arm_platform.config import TrainConfig
from arm_platform.train.checkpoint import check_state_dict, read_raw_weights

CHECKPOINT_FILES = ("model.pt", "config.json")
"""What a registered version holds (the contract's checkpoint dir minus the training state)."""
ARTIFACT_PATH = "model"
"""Run artifact folder of registered files: `model/<checkpoint dir name>/` (or `model/` a run logged itself)."""
EXPORTED = "exported_"
"""Prefix of the version tags `exported_acc1` / `_acc5` / `_loss`: the metrics of the weights model.pt holds."""
WEIGHT_METRICS = {"raw": "val_", "ema": "val_ema_"}
"""Metric prefix of each set of weights in the Train loop's reports (val_acc1 / val_ema_acc1, ...)."""
Weights = Literal["auto", "raw", "ema"]


def stage_files(
    client: MlflowClient,
    checkpoint_uri: str | None,
    run_id: str | None,
    folder: Path,
    metrics: Mapping[str, float],
    weights: Weights,
) -> tuple[TrainConfig, str]:
    """Put the version's config.json and model.pt (the chosen weights, checked) into `folder`; (config, weights)."""
    if checkpoint_uri is None:  # the run already holds the files it logged itself
        client.download_artifacts(run_id, ARTIFACT_PATH, str(folder))
        shutil.copytree(folder / ARTIFACT_PATH, folder, dirs_exist_ok=True)
        cfg = read_config(folder / "config.json")
        chosen = "ema" if cfg.optim.ema_decay else "raw"
        if weights not in ("auto", chosen):
            raise ValueError(f"run {run_id} logged {chosen} weights only; cannot export {weights} weights")
    else:
        from arm_platform.train.integrity import fetch_verified, verify_checkpoint

        manifest = verify_checkpoint(checkpoint_uri, deep=False)  # sizes; fetch_verified checks what it reads
        for filename in CHECKPOINT_FILES:
            fetch_verified(checkpoint_uri, filename, manifest, folder)
        cfg = read_config(folder / "config.json")
        ema_on = bool(cfg.optim.ema_decay)
        chosen = choose_weights(metrics, ema_on) if weights == "auto" else weights
        if chosen == "ema" and not ema_on:
            raise ValueError(f"checkpoint {checkpoint_uri} was trained without EMA (optim.ema_decay unset)")
        if chosen == "raw" and ema_on:  # model.pt holds the EMA: the raw weights live in state.pt["model"]
            export_raw_weights(checkpoint_uri, manifest, folder)
    check_state_dict(folder / "model.pt", f"model.pt of {checkpoint_uri or f'run {run_id}'}")
    return cfg, chosen


def choose_weights(metrics: Mapping[str, float], ema_on: bool) -> str:
    """The weights to export, "raw" or "ema": higher val top-1 wins (EMA on a tie); with one metric known, its set."""
    if not ema_on:
        return "raw"
    raw, ema = metrics.get("val_acc1"), metrics.get("val_ema_acc1")
    if raw is not None and ema is not None:
        return "ema" if float(ema) >= float(raw) else "raw"
    return "raw" if raw is not None else "ema"


def exported_tags(metrics: Mapping[str, float], weights: str) -> dict[str, str]:
    prefix = WEIGHT_METRICS[weights]
    return {
        f"{EXPORTED}{k}": f"{float(metrics[prefix + k]):.6g}" for k in ("acc1", "acc5", "loss") if prefix + k in metrics
    }


def export_raw_weights(checkpoint_uri: str, manifest: Mapping, folder: Path) -> None:
    """Replace folder/model.pt (the EMA copy) by the raw model weights of the checkpoint's state.pt."""
    torch.save(read_raw_weights(checkpoint_uri, dict(manifest)), folder / "model.pt")


def read_config(path: Path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path.name} is not a TrainConfig.to_dict() JSON: {err}") from err
