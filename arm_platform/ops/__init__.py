"""Mamba ops: selective scan, causal depthwise conv1d and the fused Mamba-1 inner function.

Each op has a pure-PyTorch `_ref` twin (runs anywhere, hand-written backward for the scan) and a public dispatcher
that uses the mamba-ssm / causal-conv1d CUDA kernels when they are installed and the inputs are on CUDA.
Override with `set_backend("auto" | "ref" | "kernel")` or env `ARM_OPS_BACKEND`; `active_backend()` says which runs.
"""

from arm_platform.ops._kernels import active_backend, set_backend
from arm_platform.ops.causal_conv1d import causal_conv1d, causal_conv1d_ref
from arm_platform.ops.mamba_inner import (
    mamba_inner,
    mamba_inner_no_out_proj,
    mamba_inner_no_out_proj_ref,
    mamba_inner_ref,
)
from arm_platform.ops.selective_scan import selective_scan, selective_scan_ref

__all__ = [
    "active_backend",
    "causal_conv1d",
    "causal_conv1d_ref",
    "mamba_inner",
    "mamba_inner_no_out_proj",
    "mamba_inner_no_out_proj_ref",
    "mamba_inner_ref",
    "selective_scan",
    "selective_scan_ref",
    "set_backend",
]
