"""Causal depthwise conv1d: pure-PyTorch reference and the dispatcher to causal-conv1d's `causal_conv1d_fn`.

Shapes: B batch, D channels, L length, W kernel width.
    x: (B, D, L); weight: (D, W); bias: (D,) -> (B, D, L),
    out[:, d, t] = bias_d + sum_k weight[d, k] x[:, d, t - W + 1 + k] (zero for negative times), then optional SiLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arm_platform.ops import _kernels

_ACTIVATIONS = (None, "silu", "swish")
_KERNEL_WIDTHS = (2, 3, 4)  # causal_conv1d_fn supports these widths only


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"need x (B, D, L) and weight (D, W), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"bias must be (D,) = ({x.shape[1]},), got {tuple(bias.shape)}")


def causal_conv1d_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """Depthwise causal conv as F.conv1d on the input left-padded by W - 1.

    Args:
        x: (B, D, L). weight: (D, W). bias: (D,). activation: None or "silu"/"swish".
    Returns:
        (B, D, L) in x's dtype.
    """
    _check(x, weight, bias, activation)
    w = weight.to(x.dtype).unsqueeze(1)  # (D, 1, W)
    b = bias.to(x.dtype) if bias is not None else None
    out = F.conv1d(F.pad(x, (weight.shape[-1] - 1, 0)), w, b, groups=x.shape[1])
    return F.silu(out) if activation is not None else out


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """Causal depthwise conv: the CUDA kernel when usable (width 2 to 4), else `causal_conv1d_ref`.

    Args/returns as `causal_conv1d_ref`: x (B, D, L), weight (D, W), bias (D,) -> (B, D, L).
    """
    kernels = _kernels.select(x.device)
    if kernels is None or (weight.shape[-1] not in _KERNEL_WIDTHS and _kernels.get_backend() == "auto"):
        return causal_conv1d_ref(x, weight, bias, activation)
    _check(x, weight, bias, activation)
    return kernels.causal_conv1d_fn(x, weight, bias, activation=activation)
