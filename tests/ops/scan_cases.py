"""Scan test cases shared by test_selective_scan.py and test_selective_scan_blocks.py: random inputs, their grads,
and the check of selective_scan_ref against the naive per-timestep recurrence."""

import torch

from arm_platform import ops

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch=2, dim=5, length=9, n_state=3, dtype=torch.float64, device="cpu", D=True, z=True, bias=True):
    """Random scan inputs (u, delta, A, B, C, D, z, delta_bias) with requires_grad; optional ones may be None."""
    kw = {"dtype": dtype, "device": device}
    tensors = [
        torch.randn(batch, dim, length, **kw),
        0.5 * torch.randn(batch, dim, length, **kw),
        -0.5 - torch.rand(dim, n_state, device=device, dtype=torch.promote_types(dtype, torch.float32)),
        torch.randn(batch, n_state, length, **kw),
        torch.randn(batch, n_state, length, **kw),
        torch.randn(dim, device=device, dtype=torch.promote_types(dtype, torch.float32)) if D else None,
        torch.randn(batch, dim, length, **kw) if z else None,
        0.3 * torch.randn(dim, device=device, dtype=torch.promote_types(dtype, torch.float32)) if bias else None,
    ]
    return [t.requires_grad_() if t is not None else None for t in tensors]


def grads(out, inputs, grad_out):
    leaves = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(out, leaves, grad_out))
    return [next(got) if t is not None else None for t in inputs]


def assert_matches_naive(naive_scan, assert_close, inputs, softplus=True, contiguous_grads=True, out=None):
    """Output and every gradient of selective_scan_ref (`out`, computed here unless given) equal the per-timestep
    float64 loop; output and (B, X, L) grads contiguous. Returns the output."""
    out = ops.selective_scan_ref(*inputs, delta_softplus=softplus) if out is None else out
    expected = naive_scan(*inputs, delta_softplus=softplus)
    assert out.is_contiguous()
    assert_close(out, expected, 1e-10, 1e-10, "out")
    grad_out = torch.randn_like(out)
    for name, got, want in zip(
        GRAD_NAMES, grads(out, inputs, grad_out), grads(expected, inputs, grad_out), strict=True
    ):
        assert (got is None) == (want is None), name
        if got is not None:
            assert got.is_contiguous() or got.dim() < 3 or not contiguous_grads, name  # (B, X, L) grads contiguous
            assert_close(got, want, 1e-9, 1e-10, name)
    return out
