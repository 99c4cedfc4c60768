"""arm-platform: ARM (Autoregressive Pretraining with Mamba in Vision, arXiv 2406.07537) on Ray, timm and MLflow.

`import arm_platform` stays light (no Ray, no CUDA kernels); submodules load on first use.
"""

import importlib

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
