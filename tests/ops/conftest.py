"""Fixtures of the ops tests: a naive scan, a closeness check, the kernels (skip without them), backend isolation.

Shapes: B batch, D channels, L length, N state.
"""

import pytest
import torch
import torch.nn.functional as F

from arm_platform.ops import _kernels


def _naive_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Per-timestep recurrence straight from the definition; u, delta, z (B, D, L), A (D, N), B, C (B, N, L)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        dt = delta[:, :, t, None]  # (B, D, 1)
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None]
    return y * F.silu(z) if z is not None else y


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, name: str = "") -> None:
    """torch.allclose with the max and mean absolute difference in the failure message."""
    actual, expected = actual.double(), expected.double()
    diff = (actual - expected).abs()
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (
        f"{name}: max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e} (rtol={rtol}, atol={atol})"
    )


@pytest.fixture(autouse=True)
def _isolated_backend(monkeypatch):
    """Every ops test starts from backend "auto" with no ARM_OPS_BACKEND override."""
    monkeypatch.delenv(_kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(_kernels, "_backend", None)
    torch.manual_seed(0)


@pytest.fixture
def naive_scan():
    """The per-timestep reference scan (call it on float64 inputs)."""
    return _naive_selective_scan


@pytest.fixture
def assert_close():
    """assert_close(actual, expected, rtol, atol, name) reporting max/mean differences."""
    return _assert_close


@pytest.fixture
def kernels():
    """The loaded CUDA kernel namespace; skips the test without CUDA or kernels."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ns, reason = _kernels.load_kernels()
    if ns is None:
        pytest.skip(f"mamba-ssm / causal-conv1d kernels unavailable: {reason}")
    return ns


@pytest.fixture
def tolerances():
    """(rtol, atol) per dtype for kernel vs reference, after mamba-ssm's tests/ops/test_selective_scan.py."""
    return {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2)}
