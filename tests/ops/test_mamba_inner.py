"""mamba_inner(_no_out_proj) against the spec's slow path and its explicit composition; [gpu] kernels against ref."""

import pytest
import torch
import torch.nn.functional as F

from arm_platform import ops

PARAM_NAMES = ("xz", "conv1d_weight", "conv1d_bias", "x_proj_weight", "delta_proj_weight", "A", "D", "delta_bias")


def make_params(batch=2, dim=8, length=10, n_state=4, dt_rank=2, d_model=6, dtype=torch.float64, device="cpu"):
    """Leaf tensors of one Mamba-1 direction, in the argument order of mamba_inner_no_out_proj, plus out_proj."""
    kw = {"dtype": dtype, "device": device}
    params = {
        "xz": torch.randn(batch, 2 * dim, length, **kw),
        "conv1d_weight": 0.5 * torch.randn(dim, 1, 4, **kw),
        "conv1d_bias": 0.1 * torch.randn(dim, **kw),
        "x_proj_weight": 0.3 * torch.randn(dt_rank + 2 * n_state, dim, **kw),
        "delta_proj_weight": 0.3 * torch.randn(dim, dt_rank, **kw),
        "A": -torch.arange(1, n_state + 1, **kw).repeat(dim, 1) * torch.rand(dim, 1, **kw),
        "D": torch.ones(dim, **kw) + 0.1 * torch.randn(dim, **kw),
        "delta_bias": -2.0 + 0.5 * torch.randn(dim, **kw),
    }
    out_proj = {"out_proj_weight": 0.3 * torch.randn(d_model, dim, **kw), "out_proj_bias": torch.randn(d_model, **kw)}
    for t in (*params.values(), *out_proj.values()):
        t.requires_grad_()
    return params, out_proj


def slow_path(naive_scan, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D, delta_bias):
    """Official Mamba slow path (mamba_simple.py, spec section 3.1 steps 1-6) without out_proj, naive scan."""
    dim, length = A.shape[0], xz.shape[-1]
    dt_rank, n_state = delta_proj_weight.shape[1], A.shape[1]
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, conv1d_weight, conv1d_bias, padding=3, groups=dim)[..., :length])
    x_dbl = torch.einsum("bdl,ed->ble", x, x_proj_weight)
    dt, B, C = x_dbl.split([dt_rank, n_state, n_state], dim=-1)
    delta = torch.einsum("blr,dr->bdl", dt, delta_proj_weight)
    return naive_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, z, delta_bias, delta_softplus=True)


def test_no_out_proj_matches_spec_slow_path_outputs_and_grads(naive_scan, assert_close):
    """Output y*silu(z) and the gradient of every parameter equal the float64 slow path."""
    params, _ = make_params()
    out = ops.mamba_inner_no_out_proj_ref(*params.values())
    expected = slow_path(naive_scan, *params.values())
    assert out.shape == (2, 8, 10)
    assert_close(out, expected, 1e-10, 1e-10, "out")
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, list(params.values()), grad_out)
    want = torch.autograd.grad(expected, list(params.values()), grad_out)
    for name, g, w in zip(PARAM_NAMES, got, want, strict=True):
        assert_close(g, w, 1e-9, 1e-10, name)


def test_no_out_proj_equals_explicit_composition():
    """The fused function equals causal_conv1d -> x_proj -> dt_proj -> selective_scan written out (spec 3.3)."""
    p, _ = make_params(dtype=torch.float32)
    x, z = p["xz"].chunk(2, dim=1)
    xc = ops.causal_conv1d(x, p["conv1d_weight"].squeeze(1), p["conv1d_bias"], activation="silu")
    x_dbl = F.linear(xc.transpose(1, 2), p["x_proj_weight"])  # (B, L, R + 2N)
    dt, B, C = x_dbl.split([2, 4, 4], dim=-1)
    delta = F.linear(dt, p["delta_proj_weight"]).transpose(1, 2)
    expected = ops.selective_scan(
        xc, delta, p["A"], B.transpose(1, 2), C.transpose(1, 2), p["D"], z, p["delta_bias"], delta_softplus=True
    )
    torch.testing.assert_close(ops.mamba_inner_no_out_proj(*p.values()), expected)


def test_mamba_inner_is_out_proj_of_no_out_proj(naive_scan, assert_close):
    """mamba_inner = F.linear(y^T, out_proj) (B, L, E) and matches the slow path, with grads for out_proj."""
    params, out_proj = make_params()
    out = ops.mamba_inner(**params, **out_proj)
    y = slow_path(naive_scan, *params.values())
    expected = F.linear(y.transpose(1, 2), out_proj["out_proj_weight"], out_proj["out_proj_bias"])
    assert out.shape == (2, 10, 6)
    assert_close(out, expected, 1e-10, 1e-10, "out")
    leaves = [*params.values(), *out_proj.values()]
    grad_out = torch.randn_like(out)
    for name, g, w in zip(
        [*PARAM_NAMES, *out_proj],
        torch.autograd.grad(out, leaves, grad_out),
        torch.autograd.grad(expected, leaves, grad_out),
        strict=True,
    ):
        assert_close(g, w, 1e-9, 1e-10, name)


def test_mamba_inner_positional_order_matches_mamba_inner_fn():
    """Positional arguments follow mamba_inner_fn: (..., delta_proj_weight, out_proj_weight, out_proj_bias, A, D)."""
    p, o = make_params(dtype=torch.float32)
    positional = ops.mamba_inner(
        p["xz"], p["conv1d_weight"], p["conv1d_bias"], p["x_proj_weight"], p["delta_proj_weight"],
        o["out_proj_weight"], o["out_proj_bias"], p["A"], p["D"], p["delta_bias"],
    )  # fmt: skip
    torch.testing.assert_close(positional, ops.mamba_inner_ref(**p, **o))


def test_cpu_autocast_bfloat16_runs_close_to_fp32():
    """Under CPU bf16 autocast the op returns bf16 close to fp32 and fp32 parameters still get grads."""
    p, o = make_params(dtype=torch.float32)
    expected = ops.mamba_inner(**p, **o)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.mamba_inner(**p, **o)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 and t.grad.isfinite().all() for t in p.values())


def test_rejects_mismatched_xz():
    """xz whose channel count is not 2 * D raises ValueError."""
    p, _ = make_params(dtype=torch.float32)
    p["xz"] = p["xz"][:, :10]
    with pytest.raises(ValueError, match="xz"):
        ops.mamba_inner_no_out_proj(**p)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_kernels_match_ref_on_gpu(kernels, tolerances, assert_close, autocast):
    """mamba_inner_fn and the kernel composition agree with the reference path, fp32 and bf16 autocast."""
    rtol, atol = tolerances[torch.bfloat16 if autocast else torch.float32]
    p, o = make_params(batch=2, dim=64, length=197, n_state=16, dt_rank=4, d_model=32, dtype=torch.float32)
    p, o = ({k: v.detach().cuda().requires_grad_() for k, v in d.items()} for d in (p, o))
    if autocast:  # as in the model: xz comes from in_proj under autocast, so it is bf16
        p["xz"] = p["xz"].detach().bfloat16().requires_grad_()
    leaves = [*p.values(), *o.values()]

    def run(backend):
        ops.set_backend(backend)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = ops.mamba_inner(**p, **o)
            y = ops.mamba_inner_no_out_proj(**p)
        loss = out.float().mean() + y.float().mean()
        return (out, y, *torch.autograd.grad(loss, leaves))

    got, want = run("kernel"), run("ref")
    names = ["out", "y", *PARAM_NAMES, "out_proj_weight", "out_proj_bias"]
    for name, g, w in zip(names, got, want, strict=True):
        assert_close(g, w, rtol * 5, atol * 5 * max(1.0, w.abs().max().item()), name)
