"""Save / load a full training state to a directory (what Ray Train uploads as one checkpoint).

Files: `state.pt` (model, ema, optimizer, scaler, schedule, step, epoch, RNG), `model.pt` (plain state_dict of the
model to deploy: the EMA copy when EMA is on), `config.json` (TrainConfig.to_dict()) and, written last,
`manifest.json` (sizes + sha256 of the others, see `integrity.py`). Each file is written to a temporary name and
renamed. A folder that does not verify against its manifest is refused with `CheckpointError` naming the file.
Everything loads with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from arm_platform.security import redact
from arm_platform.train.integrity import (
    MANIFEST_FILE,
    CheckpointError,
    read_manifest,
    verify_checkpoint,
    write_manifest,
)
from arm_platform.train.schedule import Schedule
from arm_platform.train.tasks import unwrap

STATE_FILE, MODEL_FILE, CONFIG_FILE = "state.pt", "model.pt", "config.json"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """torch / CUDA / numpy / python RNG states as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    epoch: int,
    config: dict[str, Any],
    scaler: torch.amp.GradScaler | None = None,
    ema: nn.Module | None = None,
    schedule: Schedule | None = None,
) -> Path:
    """Write state.pt, model.pt and config.json into `directory` (created if needed); returns the directory.

    `epoch` is the number of completed epochs; `step` the number of completed optimizer steps.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model_sd = unwrap(model).state_dict()
    ema_sd = ema.module.state_dict() if ema is not None else None
    state = {
        "model": model_sd,
        "ema": ema_sd,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "schedule": dataclasses.asdict(schedule) if schedule is not None else None,
        "step": step,
        "epoch": epoch,
        "rng": rng_state(),
    }
    _atomic_torch_save(state, out / STATE_FILE)
    _atomic_torch_save(ema_sd if ema_sd is not None else model_sd, out / MODEL_FILE)
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(redact(config), indent=2, sort_keys=True))
    os.replace(tmp, out / CONFIG_FILE)
    write_manifest(out)
    return out


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    ema: nn.Module | None = None,
    restore_rng: bool = True,
) -> dict[str, int]:
    """Restore what `save_checkpoint` wrote into the given objects; returns {"step", "epoch"}.

    Raises:
        CheckpointError: the folder does not verify against its manifest (the message names the file).
    """
    path = Path(directory) / STATE_FILE
    verify_checkpoint(str(directory), deep=True)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {STATE_FILE}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path} cannot be loaded: {err}") from err
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if state["ema"] is None:
            ema.set(unwrap(model))
        else:
            ema.module.load_state_dict(state["ema"])
    if restore_rng:
        set_rng_state(state["rng"])
    return {"step": int(state["step"]), "epoch": int(state["epoch"])}


def load_config(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / CONFIG_FILE).read_text())


def check_state_dict(
    path: str | os.PathLike, where: str, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Load `path` with weights_only=True; ValueError naming `where` unless it is a flat {str: Tensor} dict."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 (UnpicklingError, RuntimeError, EOFError, ...)
        raise ValueError(f"{where} cannot be loaded with torch.load(weights_only=True): {err}") from err
    return check_flat_state_dict(state, where)


def check_flat_state_dict(state: object, where: str) -> dict[str, torch.Tensor]:
    """`state` itself when it is a non-empty {str: Tensor} dict, else ValueError naming `where`."""
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{where} is not a state dict: got {type(state).__name__}, expected {{name: Tensor}}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{where} is not a flat state dict: entry {key!r} holds {type(value).__name__}, expected a Tensor"
            )
    return state


def pretrained_source(source: str) -> str:
    """The weights file behind a `--finetune` value: a run checkpoint folder (its model.pt) or a file / s3:// URI.

    A checkpoint folder must verify against its manifest (sizes here; the sha256 of model.pt when it is read).
    """
    from arm_platform import storage

    inner = storage.join(source, MODEL_FILE)
    if storage.exists(inner) or storage.exists(storage.join(source, MANIFEST_FILE)):
        verify_checkpoint(source, deep=False)
        return inner
    if not storage.exists(source):
        raise ValueError(f"finetune checkpoint {source!r} does not exist")
    return source


def read_weights(source: str) -> tuple[str, bytes]:
    """(URI, bytes) of the weights file behind `source` (see `pretrained_source`); a checkpoint folder's model.pt
    must match the sha256 in its manifest."""
    from arm_platform import storage

    uri = pretrained_source(source)
    raw = storage.read_bytes(uri)
    if uri != source and hashlib.sha256(raw).hexdigest() != read_manifest(source)["files"][MODEL_FILE]["sha256"]:
        raise CheckpointError(f"{uri} does not match its sha256 in {MANIFEST_FILE}")
    return uri, raw


def read_raw_weights(checkpoint_uri: str, manifest: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The raw (non-EMA) model state dict of a run checkpoint folder: state.pt["model"], sha256-verified against the
    manifest (read from the folder unless given) and loaded with weights_only=True, memory-mapped (the optimizer
    state beside it is not read). model.pt holds the EMA copy when EMA was on."""
    import tempfile

    from arm_platform.train.integrity import fetch_verified

    where = f"{checkpoint_uri.rstrip('/')}/state.pt"
    manifest = manifest if manifest is not None else read_manifest(checkpoint_uri)
    with tempfile.TemporaryDirectory(prefix="arm-raw-") as tmp:
        path = fetch_verified(checkpoint_uri, "state.pt", manifest, Path(tmp))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 (torch raises many types for bad pickles)
            raise ValueError(f"{where} cannot be loaded with weights_only=True: {err}") from err
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"{where} has no 'model' state dict (raw weights)")
    return check_flat_state_dict(state["model"], f"{where}['model']")


def load_pretrained_weights(model: nn.Module, source: str) -> tuple[list[str], list[str]]:
    """Initialise a classifier from pretraining weights (official main_finetune.py mapping in models.convert).

    Returns (missing, unexpected) keys.
    """
    from arm_platform.models.convert import load_pretrained

    uri, raw = read_weights(source)
    try:
        return load_pretrained(model, io.BytesIO(raw))
    except (RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as err:
        raise ValueError(f"cannot load pretrained weights from {uri}: {err}") from err
