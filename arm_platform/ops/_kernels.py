"""The one lazy loader of the mamba-ssm / causal-conv1d CUDA kernels, and the backend choice.

Nothing here runs at import time: `load_kernels()` probes on first use and caches the answer, so
`import arm_platform` stays light on CPU-only machines (Ray head node, CI).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import sys
from types import ModuleType, SimpleNamespace

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "ref", "kernel")
ENV_VAR = "ARM_OPS_BACKEND"
INSTALL_HINT = (
    "selective_scan_cuda / causal_conv1d kernels are not available. On a CUDA machine install the pinned versions "
    "(pyproject's gpu extra) with: MAMBA_FORCE_BUILD=TRUE MAMBA_KEEP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE "
    "pip install mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0 --no-build-isolation --no-cache-dir "
    "(or pip install '.[gpu]' with the same flags; offline, for one GPU arch: python scripts/gpu_build.py)"
)
KERNEL_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
"""Device types whose tensors go to the kernels. Only tests change it: tests/ops/kernel_shim.py adds "cpu" to run the
stock wrappers over CPU stand-ins of the compiled extensions."""

_backend: str | None = None  # set_backend() value; None defers to the env var


@functools.cache
def load_kernels() -> tuple[SimpleNamespace | None, str]:
    """Probe the CUDA kernels once.

    Returns:
        (namespace with selective_scan_fn, mamba_inner_fn, causal_conv1d_fn, or None; reason string).
    """
    if "cpu" not in KERNEL_DEVICE_TYPES and not torch.cuda.is_available():
        return None, "CUDA is not available"
    try:
        ns = _import_wrappers()
    except Exception as exc:  # the wrappers pull in triton and the compiled extensions: many ways to fail
        logger.info("Mamba CUDA kernels unavailable (%s: %s); using the PyTorch reference ops", type(exc).__name__, exc)
        return None, f"{type(exc).__name__}: {exc}"
    logger.info("Using the mamba-ssm / causal-conv1d CUDA kernels")
    return ns, "mamba-ssm and causal-conv1d CUDA kernels loaded"


def _import_wrappers() -> SimpleNamespace:
    """The stock Python wrappers: selective_scan_fn, mamba_inner_fn (mamba-ssm), causal_conv1d_fn (causal-conv1d)."""
    # Probe the extensions themselves: some installs (mamba PR #977 onwards by default) ship mamba_ssm without them.
    importlib.import_module("selective_scan_cuda")
    importlib.import_module("causal_conv1d_cuda")
    from causal_conv1d import causal_conv1d_fn

    interface = _import_scan_interface()
    return SimpleNamespace(
        selective_scan_fn=interface.selective_scan_fn,
        mamba_inner_fn=interface.mamba_inner_fn,
        causal_conv1d_fn=causal_conv1d_fn,
    )


def _import_scan_interface() -> ModuleType:
    """mamba_ssm.ops.selective_scan_interface, also where mamba_ssm's eager __init__ fails.

    mamba_ssm/__init__.py imports Mamba2, Mamba3 and MambaLMHeadModel (transformers, tilelang, ...), none of which ARM
    uses. If that import raises, mamba_ssm is registered as a bare package (its __init__ not run) and only the
    submodule is imported; `from mamba_ssm import Mamba` then fails as it would have anyway.
    """
    name = "mamba_ssm.ops.selective_scan_interface"
    try:
        return importlib.import_module(name)
    except Exception as exc:  # Mamba2/3 imports fail in many ways (ImportError, triton API changes)
        spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
        if spec is None or spec.submodule_search_locations is None:
            raise
        logger.info("mamba_ssm's __init__ failed (%s); importing %s without it", exc, name)
    sys.modules["mamba_ssm"] = importlib.util.module_from_spec(spec)
    try:
        return importlib.import_module(name)
    except Exception:
        del sys.modules["mamba_ssm"]
        raise


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
    on_kernel_device = torch.device(device).type in KERNEL_DEVICE_TYPES
    if backend == "auto" and not on_kernel_device:
        return None  # no probe needed for CPU tensors
    kernels, reason = load_kernels()
    if backend == "kernel":
        if kernels is None:
            raise RuntimeError(f"ops backend forced to 'kernel' but {reason}. {INSTALL_HINT}")
        if not on_kernel_device:
            raise RuntimeError(f"ops backend forced to 'kernel' but inputs are on {device}; the kernels need CUDA")
    return kernels


def active_backend(device: torch.device | str | None = None) -> str:
    """Which path runs for inputs on `device` (default: cuda if available else cpu): "kernel" or "ref"."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "ref" if select(device) is None else "kernel"
