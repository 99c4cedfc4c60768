"""Fused Mamba-1 inner function (spec section 3): causal conv + SiLU -> x_proj -> dt_proj -> selective scan -> gate.

Shapes: B batch, D channels (d_inner), L length, N state, R dt_rank, W conv width, E d_model.
    xz: (B, 2D, L) = in_proj output (x then z); conv1d_weight: (D, 1, W); conv1d_bias: (D,);
    x_proj_weight: (R + 2N, D); delta_proj_weight: (D, R); A: (D, N) = -exp(A_log); D, delta_bias: (D,);
    out_proj_weight: (E, D); out_proj_bias: (E,).
`mamba_inner_no_out_proj` returns y * silu(z) (B, D, L) (the Vim fork's `mamba_inner_fn_no_out_proj`);
`mamba_inner` adds out_proj and returns (B, L, E) (stock `mamba_inner_fn`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from arm_platform.ops import _kernels
from arm_platform.ops.causal_conv1d import causal_conv1d_ref
from arm_platform.ops.selective_scan import selective_scan_ref


def _inner(
    conv_fn: Callable,
    scan_fn: Callable,
    xz,
    conv1d_weight,
    conv1d_bias,
    x_proj_weight,
    delta_proj_weight,
    A,
    D,
    delta_bias,
    delta_softplus: bool,
) -> torch.Tensor:
    """Spec section 3.3 composition with the given conv and scan ops -> y * silu(z): (B, D, L)."""
    if xz.dim() != 3 or xz.shape[1] != 2 * A.shape[0]:
        raise ValueError(f"xz must be (B, 2D, L) with D={A.shape[0]} (from A), got {tuple(xz.shape)}")
    length, dt_rank, n_state = xz.shape[-1], delta_proj_weight.shape[1], A.shape[-1]
    if x_proj_weight.shape[0] != dt_rank + 2 * n_state:
        raise ValueError(f"x_proj_weight must have R + 2N = {dt_rank + 2 * n_state} rows, got {x_proj_weight.shape[0]}")
    x, z = xz.chunk(2, dim=1)
    x = conv_fn(x, rearrange(conv1d_weight, "d 1 w -> d w"), conv1d_bias, activation="silu")
    x_dbl = F.linear(rearrange(x, "b d l -> (b l) d"), x_proj_weight)  # (BL, R + 2N)
    delta = rearrange(delta_proj_weight @ x_dbl[:, :dt_rank].t(), "d (b l) -> b d l", l=length)
    B = rearrange(x_dbl[:, dt_rank : dt_rank + n_state], "(b l) n -> b n l", l=length).contiguous()
    C = rearrange(x_dbl[:, dt_rank + n_state :], "(b l) n -> b n l", l=length).contiguous()
    return scan_fn(x, delta, A, B, C, _fp32(D), z=z, delta_bias=_fp32(delta_bias), delta_softplus=delta_softplus)


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    """At least fp32 (the kernels take D and delta_bias in fp32; fp64 stays fp64 for tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32)) if t is not None else None


def mamba_inner_no_out_proj_ref(
    xz: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    delta_proj_weight: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """Pure-PyTorch inner function without out_proj: xz (B, 2D, L) -> y * silu(z) (B, D, L)."""
    args = (xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D, delta_bias, delta_softplus)
    return _inner(causal_conv1d_ref, selective_scan_ref, *args)


def mamba_inner_no_out_proj(
    xz: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    delta_proj_weight: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """Inner function without out_proj: xz (B, 2D, L) -> y * silu(z) (B, D, L); CUDA kernels when usable."""
    args = (xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D, delta_bias, delta_softplus)
    kernels = _kernels.select(xz.device)
    if kernels is None:
        return _inner(causal_conv1d_ref, selective_scan_ref, *args)
    return _inner(kernels.causal_conv1d_fn, kernels.selective_scan_fn, *args)


def mamba_inner_ref(
    xz: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    delta_proj_weight: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """Pure-PyTorch inner function with out_proj: xz (B, 2D, L) -> (B, L, E)."""
    y = mamba_inner_no_out_proj_ref(
        xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D, delta_bias, delta_softplus
    )
    return F.linear(rearrange(y, "b d l -> b l d"), out_proj_weight, out_proj_bias)


def mamba_inner(
    xz: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    delta_proj_weight: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """Inner function with out_proj: xz (B, 2D, L) -> (B, L, E); mamba-ssm's fused `mamba_inner_fn` when usable."""
    kernels = _kernels.select(xz.device)
    if kernels is None:
        return mamba_inner_ref(
            xz,
            conv1d_weight,
            conv1d_bias,
            x_proj_weight,
            delta_proj_weight,
            out_proj_weight,
            out_proj_bias,
            A,
            D,
            delta_bias,
            delta_softplus,
        )
    return kernels.mamba_inner_fn(
        xz,
        conv1d_weight,
        conv1d_bias,
        x_proj_weight,
        delta_proj_weight,
        out_proj_weight,
        out_proj_bias,
        A,
        D=D.float() if D is not None else None,
        delta_bias=delta_bias.float() if delta_bias is not None else None,
        delta_softplus=delta_softplus,
    )
