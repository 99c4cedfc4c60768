"""arm-platform: ARM (Autoregressive Pretraining with Mamba in Vision, arXiv 2406.07537) on Ray, timm and MLflow.

`import arm_platform` registers the ARM models in timm (`timm.create_model("arm_base_pz16")`, so it imports torch and
timm) and stays otherwise light: no Ray, no MLflow, no CUDA kernels; the other submodules load on first use.
"""

import importlib

from arm_platform import models  # noqa: F401  (registers the timm names)

__version__ = "0.1.0"
__all__ = [
    "config",
    "recipes",
    "ops",
    "models",
    "data",
    "train",
    "launch",
    "sweep",
    "cli",
    "tracking",
    "storage",
    "registry",
]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
