"""The one lazy loader of the mamba-ssm / causal-conv1d CUDA kernels, and the backend choice.

Nothing here runs at import time: `load_kernels()` probes on first use and caches the answer, so
`import arm_platform` stays light on CPU-only machines (Ray head node, CI).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import SimpleNamespace

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "ref", "kernel")
ENV_VAR = "ARM_OPS_BACKEND"
INSTALL_HINT = (
    "selective_scan_cuda / causal_conv1d kernels are not available. On a CUDA machine install them with: "
    "MAMBA_FORCE_BUILD=TRUE MAMBA_KEEP_CUDA_BUILD=TRUE pip install mamba-ssm causal-conv1d "
    "--no-build-isolation --no-cache-dir  (or pip install '.[gpu]' with the same flags)"
)

_backend: str | None = None  # set_backend() value; None defers to the env var


@functools.cache
def load_kernels() -> tuple[SimpleNamespace | None, str]:
    """Probe the CUDA kernels once.

    Returns:
        (namespace with selective_scan_fn, mamba_inner_fn, causal_conv1d_fn, or None; reason string).
    """
    if not torch.cuda.is_available():
        return None, "CUDA is not available"
    try:
        # Probe the extension itself: since mamba PR #977 a default install lacks it even when mamba_ssm imports.
        importlib.import_module("selective_scan_cuda")
        importlib.import_module("causal_conv1d_cuda")
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
    except Exception as exc:  # importing mamba_ssm runs an eager __init__ (triton, Mamba2/3) that can fail many ways
        logger.info("Mamba CUDA kernels unavailable (%s: %s); using the PyTorch reference ops", type(exc).__name__, exc)
        return None, f"{type(exc).__name__}: {exc}"
    ns = SimpleNamespace(
        selective_scan_fn=selective_scan_fn, mamba_inner_fn=mamba_inner_fn, causal_conv1d_fn=causal_conv1d_fn
    )
    logger.info("Using the mamba-ssm / causal-conv1d CUDA kernels")
    return ns, "mamba-ssm and causal-conv1d CUDA kernels loaded"


def set_backend(name: str) -> None:
    """Force the ops backend: "auto" (kernel on CUDA inputs when loaded), "ref" (always pure PyTorch) or "kernel"."""
    global _backend
    _backend = _check_backend(name)


def get_backend() -> str:
    """The requested backend: set_backend() value, else env ARM_OPS_BACKEND, else "auto"."""
    return _backend or _check_backend(os.environ.get(ENV_VAR, "auto"))


def _check_backend(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"ops backend must be one of {BACKENDS}, got {name!r}")
    return name


def select(device: torch.device | str) -> SimpleNamespace | None:
    """Kernels to use for inputs on `device`, or None for the reference path.

    Raises:
        RuntimeError: the backend is forced to "kernel" but the kernels are missing or `device` is not CUDA.
    """
    backend = get_backend()
    if backend == "ref":
        return None
    is_cuda = torch.device(device).type == "cuda"
    if backend == "auto" and not is_cuda:
        return None  # no probe needed for CPU tensors
    kernels, reason = load_kernels()
    if backend == "kernel":
        if kernels is None:
            raise RuntimeError(f"ops backend forced to 'kernel' but {reason}. {INSTALL_HINT}")
        if not is_cuda:
            raise RuntimeError(f"ops backend forced to 'kernel' but inputs are on {device}; the kernels need CUDA")
    return kernels


def active_backend(device: torch.device | str | None = None) -> str:
    """Which path runs for inputs on `device` (default: cuda if available else cpu): "kernel" or "ref"."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "ref" if select(device) is None else "kernel"
