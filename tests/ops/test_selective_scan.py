"""selective_scan_ref against a naive recurrence and gradcheck; backend selection; [gpu] kernel against ref."""

import ast
import importlib
from pathlib import Path

import kernel_shim
import pytest
import torch
from scan_cases import GRAD_NAMES, assert_matches_naive, grads, make_inputs

import arm_platform
from arm_platform import ops
from arm_platform.ops import _kernels

scan_module = importlib.import_module("arm_platform.ops.selective_scan")

KERNEL_PACKAGES = ("mamba_ssm", "causal_conv1d", "selective_scan_cuda", "causal_conv1d_cuda")


@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize(
    ("has_D", "has_z", "has_bias"), [(True, True, True), (False, False, False), (True, False, True)]
)
def test_ref_matches_naive_recurrence_outputs_and_grads(naive_scan, assert_close, softplus, has_D, has_z, has_bias):
    """Output and every gradient equal the float64 per-timestep loop, with and without D, z, delta_bias, softplus."""
    out = assert_matches_naive(naive_scan, assert_close, make_inputs(D=has_D, z=has_z, bias=has_bias), softplus)
    assert out.shape == (2, 5, 9) and out.dtype == torch.float64


def test_ref_chunked_scan_matches_single_chunk(monkeypatch, naive_scan, assert_close):
    """Splitting L into uneven chunks (state and dh carried across) changes neither output nor gradients."""
    monkeypatch.setattr(scan_module, "_CHUNK_ELEMS", 2 * 2 * 5 * 3)  # 2 time steps per chunk at (B, N, D) = (2, 3, 5)
    assert len(scan_module._chunks(9, 2 * 3 * 5)) == 5
    assert_matches_naive(naive_scan, assert_close, make_inputs())


def test_ref_passes_gradcheck_float64():
    """torch.autograd.gradcheck of the hand-written backward at a tiny size."""
    inputs = make_inputs(batch=1, dim=3, length=5, n_state=2)
    assert torch.autograd.gradcheck(lambda *a: ops.selective_scan_ref(*a, delta_softplus=True), inputs)


def test_ref_float32_and_bfloat16_dtypes(naive_scan, assert_close):
    """Output keeps u's dtype and grads keep each input's dtype; fp32 stays close to the float64 result."""
    inputs64 = make_inputs(length=16)
    expected = naive_scan(*inputs64, delta_softplus=True)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        inputs = [t.detach().to(dtype if t.dim() == 3 else torch.float32).requires_grad_() for t in inputs64]
        out = ops.selective_scan_ref(*inputs, delta_softplus=True)
        assert out.dtype == dtype
        assert_close(out, expected, tol, tol, str(dtype))
        out.float().sum().backward()
        assert all(t.grad is not None and t.grad.dtype == t.dtype for t in inputs)


def test_ref_rejects_bad_shapes():
    """Mismatched shapes raise ValueError naming the argument."""
    u, delta, A, B, C, D, z, bias = make_inputs()
    with pytest.raises(ValueError, match="B must be"):
        ops.selective_scan_ref(u, delta, A, B[:, :, :4], C)
    with pytest.raises(ValueError, match="A must be"):
        ops.selective_scan_ref(u, delta, A[:2], B, C)
    with pytest.raises(ValueError, match="delta_bias"):
        ops.selective_scan_ref(u, delta, A, B, C, D, z, bias[:2])


def test_dispatcher_on_cpu_runs_ref():
    """On CPU tensors the public op equals the reference and reports the "ref" backend."""
    inputs = make_inputs()
    assert ops.active_backend("cpu") == "ref"
    torch.testing.assert_close(ops.selective_scan(*inputs), ops.selective_scan_ref(*inputs))


def test_forcing_missing_kernel_raises_with_install_hint(monkeypatch):
    """set_backend("kernel") or ARM_OPS_BACKEND=kernel without usable kernels raises RuntimeError with the install."""
    monkeypatch.setattr(_kernels, "load_kernels", lambda: (None, "ImportError: no selective_scan_cuda"))
    inputs = make_inputs()
    ops.set_backend("kernel")
    with pytest.raises(RuntimeError, match=r"FORCE_BUILD=TRUE pip install mamba-ssm==\S+ causal-conv1d=="):
        ops.selective_scan(*inputs)
    with pytest.raises(RuntimeError, match="no selective_scan_cuda"):
        ops.active_backend("cpu")
    monkeypatch.setattr(_kernels, "_backend", None)
    monkeypatch.setenv("ARM_OPS_BACKEND", "kernel")
    with pytest.raises(RuntimeError, match="MAMBA_KEEP_CUDA_BUILD"):
        ops.selective_scan(*inputs)
    for dist, version in kernel_shim.pinned_versions().items():  # the hint names pyproject's gpu pins
        assert f"{dist}=={version}" in _kernels.INSTALL_HINT
    ops.set_backend("ref")  # overrides the env var and always works
    assert ops.active_backend("cuda") == "ref"
    assert ops.selective_scan(*inputs).shape == (2, 5, 9)


def test_kernel_chosen_per_call_by_device(monkeypatch):
    """With kernels loaded, "auto" picks them for CUDA inputs only; forcing them on CPU inputs raises."""
    fake = object()
    monkeypatch.setattr(_kernels, "load_kernels", lambda: (fake, "loaded"))
    assert _kernels.select("cuda") is fake and _kernels.select("cpu") is None
    assert ops.active_backend("cuda") == "kernel" and ops.active_backend("cpu") == "ref"
    ops.set_backend("kernel")
    with pytest.raises(RuntimeError, match="need CUDA"):
        _kernels.select("cpu")


def test_unknown_backend_is_rejected(monkeypatch):
    """Backend names outside auto/ref/kernel raise ValueError, from set_backend and from the env var."""
    with pytest.raises(ValueError, match="ops backend"):
        ops.set_backend("triton")
    monkeypatch.setenv("ARM_OPS_BACKEND", "fast")
    with pytest.raises(ValueError, match="fast"):
        ops.active_backend("cpu")


def test_cpu_calls_never_probe_kernels():
    """CPU calls of every op (backend "auto") decide without running the kernel probe."""
    _kernels.load_kernels.cache_clear()
    ops.selective_scan(*make_inputs())
    ops.causal_conv1d(torch.randn(1, 2, 3), torch.randn(2, 4))
    assert ops.active_backend("cpu") == "ref"
    assert _kernels.load_kernels.cache_info().currsize == 0


def test_kernel_packages_imported_only_lazily_in_kernels_module():
    """Only ops/_kernels.py names mamba_ssm / causal_conv1d, and only inside functions (so importing is free)."""
    root = Path(arm_platform.__file__).parent
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(name.split(".")[0] in KERNEL_PACKAGES for name in names):
                assert path.name == "_kernels.py" and path.parent.name == "ops", f"{path} imports {names}"
                assert id(node) not in top_level, f"{path} imports {names} at import time"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("has_D", "has_z"), [(True, True), (False, False)])
def test_kernel_matches_ref_on_gpu(kernels, tolerances, assert_close, dtype, has_D, has_z):
    """The CUDA kernel and the reference agree on outputs and all gradients within per-dtype tolerances."""
    rtol, atol = tolerances[dtype]
    inputs = make_inputs(batch=2, dim=64, length=196, n_state=16, dtype=dtype, device="cuda", D=has_D, z=has_z)
    ref_inputs = [t.detach().float().requires_grad_() if t is not None else None for t in inputs]
    out = kernels.selective_scan_fn(*inputs, delta_softplus=True)
    expected = ops.selective_scan_ref(*ref_inputs, delta_softplus=True)
    assert out.dtype == dtype
    assert_close(out, expected, rtol, atol, "out")
    grad_out = torch.randn_like(expected)
    got = grads(out, inputs, grad_out.to(dtype))
    want = grads(expected, ref_inputs, grad_out)
    for name, g, w in zip(GRAD_NAMES, got, want, strict=True):
        if g is not None:  # grads summed over B, L or D accumulate rounding: atol scales with their magnitude
            assert_close(g, w, rtol * 5, atol * 5 * max(1.0, w.abs().max().item()), name)


@pytest.mark.gpu
def test_dispatcher_uses_kernel_on_cuda(kernels):
    """On CUDA inputs with kernels loaded the public op reports and runs the kernel path."""
    assert ops.active_backend("cuda") == "kernel"
    inputs = make_inputs(dim=8, length=32, dtype=torch.float32, device="cuda")
    torch.testing.assert_close(
        ops.selective_scan(*inputs, delta_softplus=True), kernels.selective_scan_fn(*inputs, delta_softplus=True)
    )
