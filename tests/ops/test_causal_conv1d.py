"""causal_conv1d_ref against F.conv1d and the defining sum; gradcheck; [gpu] kernel against ref."""

import pytest
import torch
import torch.nn.functional as F

from arm_platform import ops


@pytest.mark.parametrize("width", [2, 3, 4, 5])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_ref_matches_padded_conv1d(width, activation, with_bias):
    """Equals nn.Conv1d(groups=D, padding=W-1) truncated to the first L outputs (the official slow path)."""
    x, weight = torch.randn(2, 6, 11), torch.randn(6, width)
    bias = torch.randn(6) if with_bias else None
    expected = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=6)[..., :11]
    expected = F.silu(expected) if activation else expected
    out = ops.causal_conv1d_ref(x, weight, bias, activation)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(ops.causal_conv1d(x, weight, bias, activation), expected)


def test_ref_matches_defining_sum_and_is_causal():
    """out[t] = b + sum_k w[k] x[t-W+1+k] with zeros before t=0; changing x[t] leaves out[<t] unchanged."""
    x, weight, bias = torch.randn(1, 3, 8, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), torch.randn(3)
    out = ops.causal_conv1d_ref(x, weight, bias.double())
    padded = F.pad(x, (3, 0))
    expected = torch.stack([(padded[..., t : t + 4] * weight).sum(-1) for t in range(8)], -1) + bias.double()[:, None]
    torch.testing.assert_close(out, expected)
    x2 = x.clone()
    x2[..., 5] += 1.0
    out2 = ops.causal_conv1d_ref(x2, weight, bias.double())
    torch.testing.assert_close(out2[..., :5], out[..., :5])
    assert not torch.allclose(out2[..., 5], out[..., 5])


def test_ref_passes_gradcheck_float64():
    """Gradients for x, weight and bias pass gradcheck in float64."""
    args = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((1, 3, 6), (3, 4), (3,))]
    assert torch.autograd.gradcheck(lambda x, w, b: ops.causal_conv1d_ref(x, w, b, "silu"), args)


def test_ref_rejects_bad_inputs():
    """Unknown activation or mismatched weight raise ValueError."""
    x = torch.randn(1, 3, 5)
    with pytest.raises(ValueError, match="activation"):
        ops.causal_conv1d_ref(x, torch.randn(3, 4), activation="relu")
    with pytest.raises(ValueError, match="weight"):
        ops.causal_conv1d_ref(x, torch.randn(4, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_ref_on_gpu(kernels, tolerances, assert_close, dtype):
    """causal_conv1d_fn and the reference agree on outputs and grads (fp32 weights, as in the model)."""
    rtol, atol = tolerances[dtype]
    x = torch.randn(2, 64, 197, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.randn(64, 4, device="cuda", requires_grad=True)
    bias = torch.randn(64, device="cuda", requires_grad=True)
    x_ref = x.detach().float().requires_grad_()
    out = kernels.causal_conv1d_fn(x, weight, bias, activation="silu")
    expected = ops.causal_conv1d_ref(x_ref, weight, bias, "silu")
    assert_close(out, expected, rtol, atol, "out")
    grad_out = torch.randn_like(expected)
    got = torch.autograd.grad(out, (x, weight, bias), grad_out.to(dtype))
    want = torch.autograd.grad(expected, (x_ref, weight, bias), grad_out)
    for name, g, w in zip(("x", "weight", "bias"), got, want, strict=True):
        assert_close(g, w, rtol * 5, atol * 5 * max(1.0, w.abs().max().item()), name)
    assert ops.active_backend("cuda") == "kernel"
    torch.testing.assert_close(ops.causal_conv1d(x, weight, bias, "silu"), out)
