"""A registered classifier version as an MLflow Model: pyfunc flavor from code, tensor signature, input example.

The folder `save` writes (a version's source, logged under the run artifact path `pyfunc/...` by the registry) holds
MLflow's files (MLmodel, serving.py, requirements.txt, python_env.yaml, conda.yaml, input_example.json,
serving_input_example.json) next to the checkpoint's `model.pt` and `config.json`: serving.py loads those two files
and `registry.pull` copies them, one copy of the weights for both. `mlflow.pyfunc.load_model("models:/NAME@ALIAS")`
and `mlflow models serve -m models:/NAME@ALIAS --env-manager local` then work on the version; the requirements pin
this package (installed where the model is served: it is not on PyPI) and torch / timm / einops / mlflow.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from arm_platform.config import TrainConfig

SERVING_CODE = Path(__file__).with_name("serving.py")
"""The models-from-code file MLflow runs to load a version (`serving.ARMClassifierModel`)."""
FLAVOR = "python_function"
"""Value of the version tag `mlflow_flavor` of versions saved as MLflow Models."""
PINNED = ("torch", "timm", "einops")
"""Distributions pinned (==, public version) next to arm-platform; MLflow pins itself."""
EXAMPLE_BATCH = 2


def servable(cfg: TrainConfig) -> bool:
    """Whether a checkpoint of `cfg` becomes an MLflow Model: classifiers only (a pretraining model has no classes)."""
    return cfg.task == "finetune"


def signature(cfg: TrainConfig) -> ModelSignature:
    """Input float32 (-1, in_chans, img_size, img_size), output float32 (-1, num_classes), param `probabilities`."""
    m = cfg.model
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, m.in_chans, m.img_size, m.img_size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, m.num_classes))]),
        params=ParamSchema([ParamSpec("probabilities", "boolean", False)]),
    )


def input_example(cfg: TrainConfig) -> np.ndarray:
    """EXAMPLE_BATCH mean images: float32 zeros (B, in_chans, img_size, img_size) (the mean after normalisation)."""
    m = cfg.model
    return np.zeros((EXAMPLE_BATCH, m.in_chans, m.img_size, m.img_size), dtype=np.float32)


def pip_requirements() -> list[str]:
    """`arm-platform==<__version__>` and the installed torch / timm / einops, pinned to their public versions (a
    `2.5.1+cpu` build pins `torch==2.5.1`, which CPU and CUDA builds of that release satisfy)."""
    from arm_platform import __version__

    pins = [f"{dist}=={importlib.metadata.version(dist).split('+')[0]}" for dist in PINNED]
    return [f"arm-platform=={__version__}", *pins]


def save(checkpoint: Path, cfg: TrainConfig, dst: Path, files: Iterable[str]) -> Path:
    """Save the MLflow Model of the checkpoint folder `checkpoint` (its `files`: model.pt, config.json) at `dst`.

    `dst` must not exist. The files are hard-linked (copied across file systems) into it; returns `dst`.
    """
    import mlflow

    mlflow.pyfunc.save_model(
        str(dst),
        python_model=str(SERVING_CODE),
        signature=signature(cfg),
        input_example=input_example(cfg),
        pip_requirements=pip_requirements(),
        metadata={"recipe": cfg.recipe, "timm_model": cfg.model.name},
    )
    for name in files:
        try:
            os.link(checkpoint / name, dst / name)
        except OSError:
            shutil.copy2(checkpoint / name, dst / name)
    return dst
