"""selective_scan_ref's chunk / block tiling, reused work buffers and fused layout paths against the naive recurrence.

Shapes: B batch, D channels, L length, N state; float64 throughout, so any tiling must agree to rounding.
"""

import importlib
import threading
from pathlib import Path

import pytest
import scan_cases
import torch
from scan_cases import GRAD_NAMES, assert_matches_naive, grads

from arm_platform import ops

scan_module = importlib.import_module("arm_platform.ops.selective_scan")

BATCH, DIM, LENGTH, N_STATE = 2, 5, 11, 3
BND = BATCH * N_STATE * DIM  # elements of one time step of the (L, B, N, D) state


def make_inputs(length=LENGTH, **kw):
    """float64 scan inputs, L = 11 unless given (scan_cases.make_inputs)."""
    return scan_cases.make_inputs(length=length, **kw)


@pytest.mark.parametrize(
    ("chunk_steps", "block_steps"), [(1, 1), (2, 1), (3, 2), (4, 3), (5, 5), (11, 1), (11, 4), (100, 100)]
)
def test_chunk_and_block_tilings_match_naive(monkeypatch, naive_scan, assert_close, chunk_steps, block_steps):
    """Every (chunk, block) tiling of L = 11, even and uneven (states and dh carried across both), is exact."""
    monkeypatch.setattr(scan_module, "_CHUNK_ELEMS", chunk_steps * BND)
    monkeypatch.setattr(scan_module, "_BLOCK_ELEMS", block_steps * BND)
    assert_matches_naive(naive_scan, assert_close, make_inputs())


@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize(
    ("has_D", "has_z", "has_bias"),
    [(True, True, True), (False, False, False), (False, True, False), (True, False, True)],
)
def test_optional_inputs_with_small_blocks(monkeypatch, naive_scan, assert_close, softplus, has_D, has_z, has_bias):
    """The fused layout paths (bias add, z gate, D skip) with and without each optional input, over many blocks."""
    monkeypatch.setattr(scan_module, "_CHUNK_ELEMS", 4 * BND)
    monkeypatch.setattr(scan_module, "_BLOCK_ELEMS", 3 * BND)
    assert_matches_naive(naive_scan, assert_close, make_inputs(D=has_D, z=has_z, bias=has_bias), softplus)


def test_strided_inputs_as_mamba_inner_passes_them(naive_scan, assert_close):
    """delta in (D, B, L) memory and z / u as slices of a (B, L, 2D) buffer (mamba_inner's layouts) are read right,
    and each (B, X, L) grad comes back laid out like its input (as the CUDA kernel's empty_like grads)."""
    u, delta, A, B, C, D, z, bias = make_inputs()
    xz = torch.randn(BATCH, LENGTH, 2 * DIM, dtype=torch.float64, requires_grad=True)
    u2, z2 = xz.transpose(1, 2).chunk(2, dim=1)  # (B, D, L) views of (B, L, 2D) memory
    delta2 = delta.detach().permute(1, 0, 2).contiguous().permute(1, 0, 2).requires_grad_()
    assert not u2.is_contiguous() and not z2.is_contiguous() and not delta2.is_contiguous()
    inputs = [u2, delta2, A, B, C, D, z2, bias]
    assert_matches_naive(naive_scan, assert_close, inputs, contiguous_grads=False)
    out = ops.selective_scan_ref(*inputs, delta_softplus=True)
    for name, x, g in zip(GRAD_NAMES, inputs, grads(out, inputs, torch.randn_like(out)), strict=True):
        if x.dim() == 3:
            assert g.stride() == torch.empty_like(x).stride(), name


def test_interleaved_calls_share_work_buffers_safely(naive_scan, assert_close, monkeypatch):
    """Forward 1, forward 2 (other shape), backward 1, backward 2: the per-thread work buffers hold nothing saved."""
    monkeypatch.setattr(scan_module, "_CHUNK_ELEMS", 3 * BND)
    first, second = make_inputs(), make_inputs(batch=3, dim=4, length=7, n_state=2)
    out1 = ops.selective_scan_ref(*first, delta_softplus=True)
    out2 = ops.selective_scan_ref(*second, delta_softplus=True)
    for inputs, out in ((first, out1), (second, out2)):
        assert_matches_naive(naive_scan, assert_close, inputs, out=out)


def test_scratch_over_the_cap_is_allocated_per_call(monkeypatch, naive_scan, assert_close):
    """With the per-thread scratch cap at 0 nothing is kept between calls, and the results stay exact."""
    monkeypatch.setattr(scan_module, "_SCRATCH_MAX_BYTES", 0)
    monkeypatch.setattr(scan_module, "_scratch", threading.local())
    monkeypatch.setattr(scan_module, "_CHUNK_ELEMS", 3 * BND)
    assert_matches_naive(naive_scan, assert_close, make_inputs())
    assert not getattr(scan_module._scratch, "buffers", {})


@pytest.mark.parametrize("first_mode", ["inference_mode", "no_grad"])
def test_work_buffers_first_made_under_inference_mode_serve_training_later(
    monkeypatch, naive_scan, assert_close, first_mode
):
    """A thread whose first scan ran under torch.inference_mode (serving, eval) can still train: the kept buffers are
    normal tensors, which both modes may write in place."""
    monkeypatch.setattr(scan_module, "_scratch", threading.local())
    inputs = make_inputs()
    with torch.inference_mode() if first_mode == "inference_mode" else torch.no_grad():
        served = ops.selective_scan_ref(*inputs, delta_softplus=True)
    assert not scan_module._scratch.buffers[torch.float64].is_inference()
    assert_matches_naive(naive_scan, assert_close, inputs)
    with torch.inference_mode():
        torch.testing.assert_close(ops.selective_scan_ref(*inputs, delta_softplus=True), served, rtol=0, atol=0)


def test_backward_twice_with_retain_graph_is_unchanged():
    """A second backward through the same graph gives the same grads (backward never writes the saved tensors)."""
    inputs = make_inputs()
    out = ops.selective_scan_ref(*inputs, delta_softplus=True)
    grad_out = torch.randn_like(out)
    leaves = [t for t in inputs if t is not None]
    first = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    second = torch.autograd.grad(out, leaves, grad_out)
    for name, g1, g2 in zip(GRAD_NAMES, first, second, strict=True):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0, msg=name)


def test_threads_get_their_own_work_buffers():
    """Concurrent calls from two threads give the same outputs and grads as one after the other."""
    torch.manual_seed(1)
    cases = [make_inputs(length=40 + i) for i in range(4)]

    def run(inputs):
        out = ops.selective_scan_ref(*inputs, delta_softplus=True)
        return [out.detach(), *torch.autograd.grad(out, [t for t in inputs if t is not None], torch.ones_like(out))]

    expected = [run(c) for c in cases]
    got = [None] * len(cases)

    def worker(idx):
        for _ in range(3):
            got[idx] = run(cases[idx])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for want, have in zip(expected, got, strict=True):
        for w, h in zip(want, have, strict=True):
            torch.testing.assert_close(h, w, rtol=0, atol=0)


def test_benchmark_scan_before_computes_the_same_scan(monkeypatch, assert_close):
    """benchmarks/scan_before.py (the old implementation train_step.py times this one against) agrees with it."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    train_step = importlib.import_module("scan_before")
    inputs = make_inputs()
    out = ops.selective_scan_ref(*inputs, delta_softplus=True)
    before = train_step.scan_before(*inputs, delta_softplus=True)
    assert_close(before, out, 1e-12, 1e-12, "out")
    grad_out = torch.randn_like(out)
    for name, got, want in zip(GRAD_NAMES, grads(before, inputs, grad_out), grads(out, inputs, grad_out), strict=True):
        assert_close(got, want, 1e-11, 1e-12, name)
