"""The CPU selective scan as it was before the blocked rewrite (arm_platform/ops/selective_scan.py at 8c73e45), kept
only so that `benchmarks/train_step.py --before-after` can time the current scan against it.

(L, B, N, D) work in 1M-element chunks, exp(dt A) and h recomputed in the backward with fresh buffers per call,
separate transpose copies in and out. Shapes as `arm_platform.ops.selective_scan_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _before_lmajor(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, X, L) -> contiguous (L, B, X) in `dtype`."""
    return x.permute(2, 0, 1).contiguous().to(dtype)


def _before_bdl(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(L, B, X) -> contiguous (B, X, L) in `dtype`."""
    return x.permute(1, 2, 0).contiguous().to(dtype)


_BEFORE_CHUNK_ELEMS = 1 << 20  # elements of one (chunk, B, N, D) work buffer: about 4 MB in fp32, stays in cache
_BEFORE_LOG2E = 1.4426950408889634  # exp(x) = exp2(x log2 e); exp2 is about 2x faster than exp on CPU


def _before_chunks(length: int, bnd: int) -> list[tuple[int, int]]:
    """[t0, t1) time chunks so that one (t1 - t0, B, N, D) buffer holds about _BEFORE_CHUNK_ELEMS elements."""
    size = max(1, min(length, _BEFORE_CHUNK_ELEMS // max(1, bnd)))
    return [(t0, min(t0 + size, length)) for t0 in range(0, length, size)]


def _before_fill_chunk(dt, dtu, a2, b_l, t0, t1, h0, buf_a, buf_h):
    """Write exp(dt_t A) into buf_a and the states h_t (t0 <= t < t1) into buf_h, starting from h0 = h_{t0-1}.

    dt, dtu: (L, B, D); a2: (N, D) = A^T log2(e); b_l: (L, B, N); h0: (B, N, D); buf_a, buf_h: (chunk, B, N, D).
    Returns the (t1 - t0, B, N, D) views (exp(dt A), h).
    """
    n = t1 - t0
    d_a, h = buf_a[:n], buf_h[:n]
    torch.mul(dt[t0:t1, :, None, :], a2, out=d_a).exp2_()
    torch.mul(dtu[t0:t1, :, None, :], b_l[t0:t1, :, :, None], out=h)
    h[0].addcmul_(d_a[0], h0)
    for t in range(1, n):
        h[t].addcmul_(d_a[t], h[t - 1])  # h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, in place
    return d_a, h


def _before_scan_fwd(dt, dtu, a2, b_l, c_l):
    """y_t = <h_t, C_t> for all t, chunk by chunk. Returns y (L, B, D) and states (chunks, B, N, D): h before each."""
    (length, batch, dim), n_state = dt.shape, a2.shape[0]
    chunks = _before_chunks(length, batch * dim * n_state)
    states = dt.new_zeros(len(chunks), batch, n_state, dim)
    buf_a = dt.new_empty(chunks[0][1], batch, n_state, dim)
    buf_h = torch.empty_like(buf_a)
    y = dt.new_empty(length, batch, 1, dim)
    for i, (t0, t1) in enumerate(chunks):
        _, h = _before_fill_chunk(dt, dtu, a2, b_l, t0, t1, states[i], buf_a, buf_h)
        torch.matmul(c_l[t0:t1, :, None, :], h, out=y[t0:t1])
        if i + 1 < len(chunks):
            states[i + 1].copy_(h[-1])
    return y.squeeze(-2), states


def _before_scan_bwd(dy, dt, dtu, a, b_l, c_l, states):
    """Reverse scan dh_t = dy_t C_t + exp(dt_{t+1} A) dh_{t+1}, recomputing h chunk by chunk from `states`.

    dy, dt, dtu: (L, B, D); a: (N, D) = A^T; b_l, c_l: (L, B, N); states: (chunks, B, N, D).
    Returns dC, dB (L, B, N); s = sum_n dh B (L, B, D); ddt_a = sum_n dh h_{t-1} exp(dt A) A (L, B, D); dA^T (N, D).
    """
    (length, batch, dim), n_state = dt.shape, a.shape[0]
    chunks = _before_chunks(length, batch * dim * n_state)
    buf_a = dt.new_empty(chunks[0][1], batch, n_state, dim)
    buf_h, buf_g, buf_t = torch.empty_like(buf_a), torch.empty_like(buf_a), torch.empty_like(buf_a)
    carry = dt.new_zeros(batch, n_state, dim)  # exp(dt_{t1} A) dh_{t1} from the chunk after
    dC, dB, s = dt.new_empty(length, batch, n_state), torch.empty_like(b_l), dt.new_empty(length, batch, 1, dim)
    ddt_a, dA = torch.empty_like(dt), torch.zeros_like(a)
    a2 = a * _BEFORE_LOG2E
    for i, (t0, t1) in reversed(list(enumerate(chunks))):
        d_a, h = _before_fill_chunk(dt, dtu, a2, b_l, t0, t1, states[i], buf_a, buf_h)
        g, tmp = buf_g[: t1 - t0], buf_t[: t1 - t0]
        torch.mul(dy[t0:t1, :, None, :], c_l[t0:t1, :, :, None], out=g)
        g[-1].add_(carry)
        for t in range(t1 - t0 - 2, -1, -1):
            g[t].addcmul_(d_a[t + 1], g[t + 1])  # g becomes dh_t in place
        torch.mul(d_a[0], g[0], out=carry)
        torch.matmul(b_l[t0:t1, :, None, :], g, out=s[t0:t1])
        torch.sum(torch.mul(g, dtu[t0:t1, :, None, :], out=tmp), -1, out=dB[t0:t1])
        torch.sum(torch.mul(h, dy[t0:t1, :, None, :], out=tmp), -1, out=dC[t0:t1])
        g[1:].mul_(h[:-1])  # g becomes dh_t h_{t-1} exp(dt_t A), the grad of (dt_t A)
        g[0].mul_(states[i])
        g.mul_(d_a)
        torch.sum(torch.mul(g, a, out=tmp), -2, out=ddt_a[t0:t1])
        dA.add_(g.mul_(dt[t0:t1, :, None, :]).sum((0, 1)))
    return dC, dB, s.squeeze(-2), ddt_a, dA


class _BeforeScanFn(torch.autograd.Function):
    """The old scan: L-major (L, B, N, D), chunked over L, saving only the state before each chunk.

    Computes in fp32 (fp64 for fp64 inputs); returns the output in u's dtype and each grad in its input's dtype.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool):
        ct = torch.promote_types(u.dtype, torch.float32)
        u_l, b_l, c_l = (
            _before_lmajor(u, ct),
            _before_lmajor(B, ct),
            _before_lmajor(C, ct),
        )  # (L, B, D), (L, B, N), (L, B, N)
        a = A.to(ct).t().contiguous()  # (N, D)
        dt = _before_lmajor(delta, ct)
        if delta_bias is not None:
            dt = dt + delta_bias.to(ct)
        dt_raw = dt if delta_softplus else None  # softplus'(x) = sigmoid(x) in backward
        if delta_softplus:
            dt = F.softplus(dt)
        y, states = _before_scan_fwd(dt, dt * u_l, a * _BEFORE_LOG2E, b_l, c_l)
        if D is not None:
            y.addcmul_(u_l, D.to(ct))
        z_l = _before_lmajor(z, ct) if z is not None else None
        out = y * F.silu(z_l) if z_l is not None else y
        ctx.dtypes = (u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype)
        ctx.extra_dtypes = tuple(t.dtype if t is not None else None for t in (D, z, delta_bias))
        ctx.save_for_backward(states, u_l, dt, dt_raw, a, b_l, c_l, D, z_l, y if z_l is not None else None, delta_bias)
        return _before_bdl(out, u.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        states, u_l, dt, dt_raw, a, b_l, c_l, D, z_l, y, delta_bias = ctx.saved_tensors
        ct = states.dtype
        dy = _before_lmajor(dout, ct)  # (L, B, D)
        dz = None
        if z_l is not None:
            sz = torch.sigmoid(z_l)
            dz = dy * y * sz * (1 + z_l * (1 - sz))  # d silu(z) / dz
            dy = dy * z_l * sz
        dC, dB, s, ddt, dA = _before_scan_bwd(dy, dt, dt * u_l, a, b_l, c_l, states)
        du = s * dt
        if D is not None:
            du.addcmul_(dy, D.to(ct))
        ddt.addcmul_(s, u_l)
        if dt_raw is not None:
            ddt.mul_(torch.sigmoid(dt_raw))
        u_dt, delta_dt, a_dt, b_dt, c_dt = ctx.dtypes
        d_dt, z_dt, bias_dt = ctx.extra_dtypes
        return (
            _before_bdl(du, u_dt),
            _before_bdl(ddt, delta_dt),
            dA.t().to(a_dt),
            _before_bdl(dB, b_dt),
            _before_bdl(dC, c_dt),
            (dy * u_l).sum((0, 1)).to(d_dt) if D is not None else None,
            _before_bdl(dz, z_dt) if dz is not None else None,
            ddt.sum((0, 1)).to(bias_dt) if delta_bias is not None else None,
            None,
        )


def scan_before(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """`selective_scan_ref` as it was before the blocked rewrite (same arguments and results)."""
    return _BeforeScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
