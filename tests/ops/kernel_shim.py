"""Test-only CPU stand-ins for the compiled extensions `selective_scan_cuda` and `causal_conv1d_cuda`.

The stock Python wrappers of the pinned versions (pyproject's gpu extra: mamba-ssm 2.3.2.post1
`mamba_ssm/ops/selective_scan_interface.py`, causal-conv1d 1.7.0 `causal_conv1d/cpp_functions.py`) call these
functions. Each stand-in has the argument list, return value and in-place writes of its C++ binding
(`csrc/selective_scan/selective_scan.cpp`, `csrc/causal_conv1d.cpp`), runs that binding's dtype / shape / stride
checks (all but `is_cuda`) and computes with arm_platform's pure-PyTorch ops in fp32, as the kernels do. Only what ARM
uses is implemented (real A, one B/C group, no seq_idx or conv states); anything else raises NotImplementedError.
`x`, the scan's chunk states, is returned filled with NaN: the ARM path never reads it (return_last_state would).

Shapes: B batch, D channels, L length, N state, W conv width.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import importlib.metadata
import importlib.util
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arm_platform.ops import _kernels, causal_conv1d_ref, selective_scan_ref

CALLS: collections.Counter[str] = collections.Counter()
"""Calls per stand-in function, so a test can prove the kernel branch ran through them."""

INPUT_TYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK = 2048  # selective_scan_cuda keeps the scan state every 2048 steps: x is (B, D, ceil(L / 2048), 2N)


def _check(cond: bool, what: str) -> None:
    """TORCH_CHECK: RuntimeError when `cond` fails."""
    if not cond:
        raise RuntimeError(f"kernel shim: expected {what}")


def _check_shape(t: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    _check(tuple(t.shape) == tuple(shape), f"{name} of shape {tuple(shape)}, got {tuple(t.shape)}")


def _unit_stride(t: torch.Tensor, name: str) -> None:
    _check(t.stride(-1) == 1 or t.size(-1) == 1, f"{name} with stride(-1) == 1, got strides {t.stride()}")


def _unsupported(**optional: torch.Tensor | None) -> None:
    for name, t in optional.items():
        if t is not None:
            raise NotImplementedError(f"kernel shim: {name} is not used by ARM and not implemented")


# --------------------------------------------------------------------------------------------------------------------
# selective_scan_cuda (selective_scan.cpp: selective_scan_fwd / selective_scan_bwd)


def _check_scan(u, delta, A, B, C, D_, z_, delta_bias_) -> int:
    """The shared checks of selective_scan_fwd / _bwd; returns n_chunks."""
    itype = u.dtype
    _check(itype in INPUT_TYPES, f"u in fp32/fp16/bf16, got {itype}")
    if A.is_complex():
        raise NotImplementedError("kernel shim: complex A is not used by ARM")
    _check(A.dtype == torch.float32, f"A in fp32, got {A.dtype}")
    _check(delta.dtype == itype, f"delta in u's dtype {itype}, got {delta.dtype}")
    for name, t in (("B", B), ("C", C)):
        _check(t.dim() >= 3, f"{name} input-dependent (B, G, N, L) as ARM uses it, got {tuple(t.shape)}")
        _check(t.dtype == itype, f"{name} in u's dtype {itype}, got {t.dtype}")
    _unit_stride(u, "u")
    _unit_stride(delta, "delta")
    batch, dim, length = u.shape
    dstate = A.shape[1]
    _check(dstate <= 256, "dstate <= 256")
    _check_shape(delta, (batch, dim, length), "delta")
    _check_shape(A, (dim, dstate), "A")
    for name, t in (("B", B), ("C", C)):
        _check_shape(t, (batch, B.shape[1], dstate, length), name)
        _unit_stride(t, name)
    if B.shape[1] != 1:
        raise NotImplementedError("kernel shim: ARM uses one B/C group")
    for name, t in (("D", D_), ("delta_bias", delta_bias_)):
        if t is not None:
            _check(t.dtype == torch.float32, f"{name} in fp32, got {t.dtype}")
            _unit_stride(t, name)
            _check_shape(t, (dim,), name)
    if z_ is not None:
        _check(z_.dtype == itype, f"z in u's dtype {itype}, got {z_.dtype}")
        _unit_stride(z_, "z")
        _check_shape(z_, (batch, dim, length), "z")
    return (length + CHUNK - 1) // CHUNK


def _scan_fp32(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Our reference scan in fp32 on (B, 1, N, L) B/C; differentiable in whatever requires grad."""
    f = torch.float32
    return selective_scan_ref(u.to(f), delta.to(f), A, B[:, 0].to(f), C[:, 0].to(f), D, z, delta_bias, delta_softplus)


def selective_scan_fwd(u, delta, A, B, C, D_, z_, delta_bias_, delta_softplus):
    """-> [out, x] or [out, x, out_z]: out = y (B, D, L) like delta, x (B, D, chunks, 2N) fp32, out_z = y silu(z)."""
    CALLS["selective_scan_cuda.fwd"] += 1
    n_chunks = _check_scan(u, delta, A, B, C, D_, z_, delta_bias_)
    with torch.no_grad():
        y = _scan_fp32(u, delta, A, B, C, D_, None, delta_bias_, delta_softplus)
    out = torch.empty_like(delta).copy_(y)
    x = torch.full((u.shape[0], u.shape[1], n_chunks, 2 * A.shape[1]), float("nan"), dtype=A.dtype)
    if z_ is None:
        return [out, x]
    return [out, x, torch.empty_like(z_).copy_(y * F.silu(z_.float()))]


def _check_scan_bwd(u, z_, dout, x_, out_, dz_, n_chunks, dstate) -> None:
    itype = u.dtype
    _check(dout.dtype == itype, f"dout in u's dtype {itype}, got {dout.dtype}")
    _unit_stride(dout, "dout")
    _check_shape(dout, tuple(u.shape), "dout")
    if z_ is not None:
        _check(out_ is not None, "out (the saved y) when z is given")
        for name, t in (("out", out_), ("dz", dz_)):
            if t is not None:
                _check(t.dtype == itype, f"{name} in u's dtype {itype}, got {t.dtype}")
                _unit_stride(t, name)
                _check_shape(t, tuple(u.shape), name)
    _check(n_chunks == 1 or x_ is not None, "x when L > 2048")
    if x_ is not None:
        _check(x_.dtype == torch.float32 and x_.is_contiguous(), "x contiguous in A's dtype")
        _check_shape(x_, (u.shape[0], u.shape[1], n_chunks, 2 * dstate), "x")


def _scan_grads(u, delta, A, B, C, D_, z_, delta_bias_, dout, delta_softplus) -> dict[str, torch.Tensor | None]:
    """fp32 gradients of y * silu(z) (or y) by autograd through our reference scan."""
    given = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D_, "z": z_, "delta_bias": delta_bias_}
    leaves = {k: v.detach().float().requires_grad_() for k, v in given.items() if v is not None}
    with torch.enable_grad():
        args = [leaves.get(k) for k in given]
        out = _scan_fp32(*args, delta_softplus)
        grads = torch.autograd.grad(out, list(leaves.values()), dout.float())
    return {**dict.fromkeys(given), **dict(zip(leaves, grads, strict=True))}


def selective_scan_bwd(u, delta, A, B, C, D_, z_, delta_bias_, dout, x_, out_, dz_, delta_softplus, recompute_out_z):
    """-> [du, ddelta, dA, dB, dC, dD, ddelta_bias] (+ [dz] with z) (+ [out_z] if recompute_out_z).

    du, ddelta like u / delta; dA fp32; dB, dC in B's / C's dtype; dD, ddelta_bias fp32 or None; dz written into the
    given `dz_` when there is one (mamba_inner_fn passes a view of its dxz buffer).
    """
    CALLS["selective_scan_cuda.bwd"] += 1
    n_chunks = _check_scan(u, delta, A, B, C, D_, z_, delta_bias_)
    _check_scan_bwd(u, z_, dout, x_, out_, dz_, n_chunks, A.shape[1])
    g = _scan_grads(u, delta, A, B, C, D_, z_, delta_bias_, dout, delta_softplus)
    result = [
        torch.empty_like(u).copy_(g["u"]),
        torch.empty_like(delta).copy_(g["delta"]),
        g["A"],
        g["B"].to(B.dtype),
        g["C"].to(C.dtype),
        g["D"],
        g["delta_bias"],
    ]
    if z_ is not None:
        dz = dz_ if dz_ is not None else torch.empty_like(z_)
        result.append(dz.copy_(g["z"]))
    if recompute_out_z:
        out_z = None if z_ is None else torch.empty_like(out_).copy_(out_.float() * F.silu(z_.float()))
        result.append(out_z)
    return result


# --------------------------------------------------------------------------------------------------------------------
# causal_conv1d_cuda (causal_conv1d.cpp: causal_conv1d_fwd / causal_conv1d_bwd / causal_conv1d_update)


def _check_conv(x, weight, bias_) -> None:
    _check(x.dtype in INPUT_TYPES, f"x in fp32/fp16/bf16, got {x.dtype}")
    _check(weight.dtype in INPUT_TYPES, f"weight in fp32/fp16/bf16, got {weight.dtype}")
    _check(x.dim() == 3, f"x (B, D, L), got {tuple(x.shape)}")
    batch, dim, _ = x.shape
    width = weight.shape[-1]
    _check_shape(weight, (dim, width), "weight")
    _check(2 <= width <= 4, "width between 2 and 4")
    _check(x.stride(2) == 1 or x.stride(1) == 1, f"x with stride(2) == 1 or stride(1) == 1, got {x.stride()}")
    if x.stride(1) == 1 and x.stride(2) > 1:  # channel-last kernel
        _check(dim % 8 == 0 and x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0, "channel-last x: D, strides % 8")
    if bias_ is not None:
        _check(bias_.dtype == weight.dtype, f"bias in weight's dtype {weight.dtype}, got {bias_.dtype}")
        _check(bias_.stride(-1) == 1, "bias with stride(-1) == 1")
        _check_shape(bias_, (dim,), "bias")


def _conv_fp32(x, weight, bias, silu_activation: bool) -> torch.Tensor:
    """Our reference causal conv in fp32 (the kernel converts inputs and weights to fp32)."""
    bias = bias.float() if bias is not None else None
    return causal_conv1d_ref(x.float(), weight.float(), bias, "silu" if silu_activation else None)


def causal_conv1d_fwd(x, weight, bias_, seq_idx_, initial_states_, out, final_states_out_, silu_activation) -> None:
    """Writes the causal conv of x (B, D, L) with weight (D, W), bias (D,) into `out` (B, D, L); returns None."""
    CALLS["causal_conv1d_cuda.causal_conv1d_fwd"] += 1
    _check_conv(x, weight, bias_)
    _unsupported(seq_idx=seq_idx_, initial_states=initial_states_, final_states_out=final_states_out_)
    _check(out.dtype == x.dtype, f"out in x's dtype {x.dtype}, got {out.dtype}")
    _check_shape(out, tuple(x.shape), "out")
    with torch.no_grad():
        out.copy_(_conv_fp32(x, weight, bias_, silu_activation))


def causal_conv1d_bwd(
    x, weight, bias_, dout, seq_idx_, initial_states_, dfinal_states_, dx, dweight, dbias_, dinitial_states_,
    silu_activation,
) -> None:  # fmt: skip
    """Writes dx (B, D, L) and ADDS into the fp32 zero-filled dweight (D, W) / dbias (D,), as the kernel's atomics."""
    CALLS["causal_conv1d_cuda.causal_conv1d_bwd"] += 1
    _check_conv(x, weight, bias_)
    _check((bias_ is None) == (dbias_ is None), "dbias exactly when bias is given")
    _check_shape(dout, tuple(x.shape), "dout")
    _unsupported(seq_idx=seq_idx_, initial_states=initial_states_, dfinal_states=dfinal_states_)
    _unsupported(dinitial_states=dinitial_states_)
    _check(dx.dtype == x.dtype, f"dx in x's dtype {x.dtype}, got {dx.dtype}")
    _check_shape(dx, tuple(x.shape), "dx")
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    _check(dx.stride(1 if channel_last else 2) == 1, f"dx in x's layout, got strides {dx.stride()}")
    for name, t, shape in (("dweight", dweight, weight.shape), ("dbias", dbias_, (x.shape[1],))):
        if t is not None:
            _check(t.dtype == torch.float32, f"{name} in fp32 (the kernel accumulates in fp32), got {t.dtype}")
            _check_shape(t, tuple(shape), name)
    dx_, dweight_, dbias = _conv_grads(x.float(), weight.float(), bias_, dout.float(), silu_activation)
    dx.copy_(dx_)
    dweight.add_(dweight_)
    if dbias_ is not None:
        dbias_.add_(dbias)


def _conv_grads(x, weight, bias, dout, silu_activation: bool):
    """Explicit fp32 backward of the causal conv (x (B, D, L), weight (D, W), dout (B, D, L)) -> dx, dweight, dbias.

    Written out because the stock wrapper calls the binding inside a torch.library custom op, below autograd.
    """
    width = weight.shape[-1]
    g = dout
    if silu_activation:
        pre = _conv_fp32(x, weight, bias, False)
        sig = torch.sigmoid(pre)
        g = dout * sig * (1 + pre * (1 - sig))  # d silu(p) / dp
    windows = F.pad(x, (width - 1, 0)).unfold(-1, width, 1)  # (B, D, L, W): x[t - W + 1 + k]
    dweight = torch.einsum("bdl,bdlw->dw", g, windows)
    dx = F.conv1d(F.pad(g, (0, width - 1)), weight.flip(-1).unsqueeze(1), groups=x.shape[1])
    return dx, dweight, g.sum((0, 2))


def causal_conv1d_update(
    x, conv_state, weight, bias_, out, silu_activation, cache_seqlens_, conv_state_indices_
) -> None:  # fmt: skip
    raise NotImplementedError("kernel shim: causal_conv1d_update (decoding) is not used by ARM")


# --------------------------------------------------------------------------------------------------------------------
# installing the shim


def modules() -> dict[str, types.ModuleType]:
    """Fresh `selective_scan_cuda` and `causal_conv1d_cuda` stand-in modules."""
    scan = types.ModuleType("selective_scan_cuda", "kernel_shim stand-in")
    scan.fwd, scan.bwd = selective_scan_fwd, selective_scan_bwd
    conv = types.ModuleType("causal_conv1d_cuda", "kernel_shim stand-in")
    conv.causal_conv1d_fwd, conv.causal_conv1d_bwd = causal_conv1d_fwd, causal_conv1d_bwd
    conv.causal_conv1d_update = causal_conv1d_update
    return {"selective_scan_cuda": scan, "causal_conv1d_cuda": conv}


def pinned_versions() -> dict[str, str]:
    """{"mamba-ssm": "2.3.2.post1", "causal-conv1d": "1.7.0"} from pyproject.toml's gpu extra."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    pins = (req.split("==") for req in pyproject["project"]["optional-dependencies"]["gpu"])
    return {name.strip(): version.strip() for name, version in pins}


def require_pinned_sources() -> None:
    """Skip the calling test unless the pinned mamba-ssm / causal-conv1d Python sources are installed."""
    for dist, version in pinned_versions().items():
        try:
            found = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{dist}=={version} Python sources not installed (scripts/install.sh installs them)")
        if found != version:
            pytest.skip(f"the kernel shim follows {dist}=={version}, found {found}")


def install(monkeypatch: pytest.MonkeyPatch):
    """Run the stock wrappers over the stand-ins and route CPU tensors to them through our dispatcher.

    Registers the stand-ins (in sys.modules where no real extension exists, and inside the imported wrappers), lets
    `_kernels.KERNEL_DEVICE_TYPES` include "cpu" and runs the real `load_kernels()` probe; monkeypatch undoes it all
    but the probe's cache (clear it after the test).

    Returns:
        the probed namespace of stock functions: selective_scan_fn, mamba_inner_fn, causal_conv1d_fn.
    """
    require_pinned_sources()
    fakes = modules()
    for name, module in fakes.items():
        if name not in sys.modules and importlib.util.find_spec(name) is None:  # no real extension: import the fake
            monkeypatch.setitem(sys.modules, name, module)
    # Where a real extension exists, the wrappers bind it at import and get the fake only until monkeypatch undoes it,
    # so later GPU tests in the same session run the real kernels, never the stand-ins.
    interface = _kernels._import_scan_interface()
    cpp_functions = importlib.import_module("causal_conv1d.cpp_functions")
    monkeypatch.setattr(interface, "selective_scan_cuda", fakes["selective_scan_cuda"])
    monkeypatch.setattr(cpp_functions, "causal_conv1d_cuda", fakes["causal_conv1d_cuda"])
    monkeypatch.setattr(_kernels, "KERNEL_DEVICE_TYPES", ("cuda", "cpu"))
    _kernels.load_kernels.cache_clear()  # the caller clears it again after the test
    ns, reason = _kernels.load_kernels()
    assert ns is not None, reason
    return ns


@contextlib.contextmanager
def gpu_style_bf16_autocast():
    """bf16 autocast as the GPU runs it, as far as CPU allows.

    CUDA autocast cannot be entered without CUDA, so: CPU autocast in bf16 (it casts F.linear / matmul / conv on CPU
    tensors like CUDA autocast does on CUDA ones) plus the CUDA autocast flag and dtype, which mamba_inner_fn reads
    through torch.is_autocast_enabled() / get_autocast_gpu_dtype() to cast its projection weights. Backward runs
    without autocast here (custom_bwd re-enters CUDA autocast on a GPU).
    """
    enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", dtype)
