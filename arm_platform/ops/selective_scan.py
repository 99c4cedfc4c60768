"""Selective scan (Mamba-1 S6): pure-PyTorch reference with a hand-written backward, and the dispatcher.

Shapes: B batch, D channels, L length, N state.
    u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L); D, delta_bias: (D,).
Recurrence per channel d and state n (mamba-ssm `selective_scan_fn` semantics):
    dt = softplus(delta + delta_bias) (or without softplus); h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;
    y_t = <h_t, C_t> + D u_t; out = y * silu(z).

CPU layout of `SelectiveScanFn`: the state lives in an L-major (L, B, N, D) layout. The forward keeps only the state
before each chunk of _CHUNK_ELEMS elements (a few MB); the backward recomputes exp(dt A) and h one chunk at a time and
runs the reverse recurrence dh_t = dy_t C_t + w_{t+1}, w_t = exp(dt_t A) dh_t over the chunk. Inside a chunk every op
works on blocks of _BLOCK_ELEMS elements (one time step at the tiny/small sizes), so that an op's operands are still
in cache from the op before; the chunk buffers are per-thread scratch reused across calls (fresh memory costs a page
fault per 4 KB). Saving every h in the forward instead was measured and did not pay (see benchmarks/train_step.py).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from arm_platform.ops import _kernels

_CHUNK_ELEMS = 1 << 20  # elements of one (chunk, B, N, D) chunk: the backward recomputes h one chunk at a time
_BLOCK_ELEMS = 1 << 17  # elements of one (block, B, N, D) block of a chunk: each op's operands stay in L2
_SCRATCH_MAX_BYTES = 256 << 20  # larger scratch is allocated per call instead of being kept by the thread
_scratch = threading.local()  # per-thread reusable work buffers (CPU): fresh memory costs a page fault per 4 KB


def _lmajor(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, X, L) -> contiguous (L, B, X) in `dtype`, in one copy."""
    return torch.empty(x.shape[2], x.shape[0], x.shape[1], dtype=dtype, device=x.device).copy_(x.permute(2, 0, 1))


def _empty_bdl(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised contiguous (B, X, L) for an (L, B, X) tensor."""
    return torch.empty(x.shape[1], x.shape[2], x.shape[0], dtype=dtype, device=x.device)


def _layout(x: torch.Tensor) -> torch.Tensor:
    """A storage-free (meta) tensor with the strides empty_like(x) would get: x's own dim order."""
    return torch.empty_like(x, device="meta")


def _grad_like(layout: torch.Tensor, x_l: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(L, B, X) -> (B, X, L) in `dtype` laid out like the input (as the kernel's empty_like grads), one copy."""
    out = torch.empty_strided(layout.shape, layout.stride(), dtype=dtype, device=x_l.device)
    out.permute(2, 0, 1).copy_(x_l)
    return out


def _workspace(rows: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Scratch (rows, *shape) in like's dtype; on CPU a view of a buffer kept per thread and reused across calls.

    Only for buffers that die with the call (never saved for backward): the next call on this thread overwrites it.
    At most _SCRATCH_MAX_BYTES per dtype and thread is kept; GPUs allocate per call (their allocator caches).
    """
    numel = rows * math.prod(shape)
    if like.device.type != "cpu" or numel * like.element_size() > _SCRATCH_MAX_BYTES:
        return like.new_empty(rows, *shape)
    cache = _scratch.__dict__.setdefault("buffers", {})
    flat = cache.get(like.dtype)
    if flat is None or flat.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: an inference one refuses in-place writes outside the mode
            flat = cache[like.dtype] = torch.empty(numel, dtype=like.dtype)
    return flat[:numel].view(rows, *shape)


def _chunks(length: int, bnd: int) -> list[tuple[int, int]]:
    """[t0, t1) time chunks so that one (t1 - t0, B, N, D) buffer holds about _CHUNK_ELEMS elements."""
    return _spans(0, length, bnd, _CHUNK_ELEMS)


def _spans(t0: int, t1: int, bnd: int, elems: int) -> list[tuple[int, int]]:
    """[t0, t1) cut into spans of max(1, elems // bnd) steps (the last one shorter)."""
    size = max(1, min(t1 - t0, elems // max(1, bnd)))
    return [(s, min(s + size, t1)) for s in range(t0, t1, size)]


def _fill_block(dt_r, dtu_r, a, b_c, t0, t1, d_a, h):
    """Write exp(dt_t A) into d_a[t - t0] and the state h_t into h[t - t0 + 1] for t0 <= t < t1; h[0] = h_{t0-1}.

    dt_r, dtu_r: (L, B, 1, D); a: (N, D) = A^T; b_c: (L, B, N, 1); d_a: (t1 - t0, B, N, D); h: (t1 - t0 + 1, B, N, D).
    """
    torch.mul(dt_r[t0:t1], a, out=d_a).exp_()
    torch.mul(dtu_r[t0:t1], b_c[t0:t1], out=h[1:])
    for t in range(t1 - t0):
        h[t + 1].addcmul_(d_a[t], h[t])  # h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, in place


def _scan_fwd(dt, dtu, a, b_l, c_l):
    """y_t = <h_t, C_t> for all t, block by block. Returns y (L, B, D) and states (chunks, B, N, D): h before each."""
    (length, batch, dim), n_state = dt.shape, a.shape[0]
    bnd = batch * n_state * dim
    chunks = _chunks(length, bnd)
    size = chunks[0][1]
    blk = _spans(0, size, bnd, _BLOCK_ELEMS)[0][1]
    states = dt.new_empty(len(chunks), batch, n_state, dim)
    states[0].zero_()
    work = _workspace(2 * size + 1, (batch, n_state, dim), dt)
    d_a, h = work[:size], work[size:]  # the chunk's exp(dt A) and states (h[0]: the one before)
    y = dt.new_empty(length, batch, 1, dim)
    views = dt[:, :, None], dtu[:, :, None], a, b_l[..., None]
    c_r = c_l[:, :, None]
    for i, (c0, c1) in enumerate(chunks):
        h[0].copy_(states[i])
        for t0, t1 in _spans(c0, c1, bnd, blk * bnd):
            r0, r1 = t0 - c0, t1 - c0
            _fill_block(*views, t0, t1, d_a[r0:r1], h[r0 : r1 + 1])
            torch.matmul(c_r[t0:t1], h[r0 + 1 : r1 + 1], out=y[t0:t1])
        if i + 1 < len(chunks):
            states[i + 1].copy_(h[c1 - c0])
    return y.squeeze(-2), states


def _scan_bwd(dy, dt, dtu, a, b_l, c_l, states):
    """Reverse scan dh_t = dy_t C_t + w_{t+1}, w_t = exp(dt_t A) dh_t, recomputing h chunk by chunk from `states`.

    dy, dt, dtu: (L, B, D); a: (N, D) = A^T; b_l, c_l: (L, B, N); states: (chunks, B, N, D).
    Returns dC, dB (L, B, N); s = sum_n dh B (L, B, D); ddt_a = sum_n w h_{t-1} A (L, B, D); dA^T (N, D).
    """
    (length, batch, dim), n_state = dt.shape, a.shape[0]
    bnd = batch * n_state * dim
    chunks = _chunks(length, bnd)
    size = chunks[0][1]
    blk = _spans(0, size, bnd, _BLOCK_ELEMS)[0][1]
    work = _workspace(2 * size + 1 + 3 * blk, (batch, n_state, dim), dt)
    d_a, h = work[:size], work[size : 2 * size + 1]  # the chunk's exp(dt A) and states (h[0]: the one before)
    g, w_buf, acc = work[2 * size + 1 :].split(blk)  # a block's dh and w; the dA sum
    acc.zero_()  # sum over blocks of w h_{t-1} dt (the grad of dt A times dt): dA^T after a final sum
    dC, dB = dt.new_empty(length, batch, n_state, 1), dt.new_empty(length, batch, n_state, 1)
    s, ddt_a = dt.new_empty(length, batch, 1, dim), dt.new_empty(length, batch, 1, dim)
    dt_r, dtu_r, dy_r, b_r = dt[:, :, None], dtu[:, :, None], dy[:, :, None], b_l[:, :, None]
    b_c, c_c = b_l[..., None], c_l[..., None]
    dtu_c, dy_c = dtu[..., None], dy[..., None]
    carry = None  # w_{t1} of the block after (w_buf[0]: read before this block overwrites it)
    for i in range(len(chunks) - 1, -1, -1):
        c0, c1 = chunks[i]
        h[0].copy_(states[i])
        blocks = _spans(c0, c1, bnd, blk * bnd)
        for t0, t1 in blocks:
            _fill_block(dt_r, dtu_r, a, b_c, t0, t1, d_a[t0 - c0 : t1 - c0], h[t0 - c0 : t1 - c0 + 1])
            torch.matmul(h[t0 - c0 + 1 : t1 - c0 + 1], dy_c[t0:t1], out=dC[t0:t1])  # while h is in cache
        for t0, t1 in reversed(blocks):
            n, r0 = t1 - t0, t0 - c0
            w, gb = w_buf[:n], g[:n]
            if carry is None:
                torch.mul(dy_r[t1 - 1], c_c[t1 - 1], out=g[n - 1])
            else:
                torch.addcmul(carry, dy_r[t1 - 1], c_c[t1 - 1], out=g[n - 1])
            for t in range(n - 1, -1, -1):
                torch.mul(d_a[r0 + t], g[t], out=w[t])
                if t:
                    torch.addcmul(w[t], dy_r[t0 + t - 1], c_c[t0 + t - 1], out=g[t - 1])  # dh_{t-1} = dy C + w_t
            carry = w[0]
            torch.matmul(b_r[t0:t1], gb, out=s[t0:t1])
            torch.matmul(gb, dtu_c[t0:t1], out=dB[t0:t1])
            p = torch.mul(w, h[r0 : r0 + n], out=gb)  # dh_t exp(dt_t A) h_{t-1}: the grad of dt_t A
            acc[:n].addcmul_(p, dt_r[t0:t1])
            torch.sum(p.mul_(a), -2, keepdim=True, out=ddt_a[t0:t1])
    return dC.squeeze(-1), dB.squeeze(-1), s.squeeze(-2), ddt_a.squeeze(-2), acc.sum((0, 1))


class SelectiveScanFn(torch.autograd.Function):
    """Sequential scan in an L-major (L, B, N, D) layout, chunked over L; saves only the state before each chunk.

    Within a chunk the work goes in blocks of _BLOCK_ELEMS so that each op's operands stay in cache. The (B, D, L) <->
    (L, B, D) transposes are fused into the first / last elementwise op where one exists (bias add, z gate, du).
    Computes in fp32 (fp64 for fp64 inputs); returns the output (contiguous) in u's dtype and each grad in its input's
    dtype, the (B, X, L) grads laid out like their inputs (as the CUDA kernel's empty_like grads).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool):
        ct = torch.promote_types(u.dtype, torch.float32)
        u_l, b_l, c_l = _lmajor(u, ct), _lmajor(B, ct), _lmajor(C, ct)  # (L, B, D), (L, B, N), (L, B, N)
        a = A.to(ct).t().contiguous()  # (N, D)
        if delta_bias is not None:  # the transpose to (L, B, D) fused into the bias add
            dt = torch.add(delta.permute(2, 0, 1).to(ct), delta_bias.to(ct), out=torch.empty_like(u_l))
        else:
            dt = _lmajor(delta, ct)
        dt_raw = dt if delta_softplus else None  # softplus'(x) = sigmoid(x) in backward
        if delta_softplus:
            dt = F.softplus(dt)
        dtu = dt * u_l
        y, states = _scan_fwd(dt, dtu, a, b_l, c_l)
        if D is not None:
            y.addcmul_(u_l, D.to(ct))
        y_bdl = y.permute(1, 2, 0)  # (B, D, L) view
        out = _empty_bdl(y, u.dtype)
        z_c = silu_z = None
        if z is not None:  # gate in z's own (B, D, L) layout, the transpose of y fused into the product
            z_c = z.to(ct)
            silu_z = F.silu(z_c)
            torch.mul(y_bdl, silu_z, out=out)
        else:
            out.copy_(y_bdl)
        ctx.dtypes = (u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype)
        ctx.extra_dtypes = tuple(t.dtype if t is not None else None for t in (D, z, delta_bias))
        ctx.layouts = tuple(_layout(t) if t is not None else None for t in (u, delta, B, C, z))
        saved_y = y if z is not None else None
        ctx.save_for_backward(states, u_l, dt, dtu, dt_raw, a, b_l, c_l, D, z_c, silu_z, saved_y, delta_bias)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        states, u_l, dt, dtu, dt_raw, a, b_l, c_l, D, z_c, silu_z, y, delta_bias = ctx.saved_tensors
        ct = states.dtype
        u_dt, delta_dt, a_dt, b_dt, c_dt = ctx.dtypes
        d_dt, z_dt, bias_dt = ctx.extra_dtypes
        u_like, delta_like, b_like, c_like, z_like = ctx.layouts  # each grad is laid out like its input
        dz = None
        if z_c is not None:  # dy = dout silu(z) (written L-major), dz = dout y silu'(z) (in z's layout)
            dout_c = dout.to(ct)
            dy = torch.mul(dout_c.permute(2, 0, 1), silu_z.permute(2, 0, 1), out=torch.empty_like(u_l))
            dz = torch.empty_strided(z_like.shape, z_like.stride(), dtype=ct, device=dout.device)
            dz = torch.ops.aten.silu_backward(torch.mul(dout_c, y.permute(1, 2, 0), out=dz), z_c).to(z_dt)
        else:
            dy = _lmajor(dout, ct)  # (L, B, D)
        dC, dB, s, ddt, dA = _scan_bwd(dy, dt, dtu, a, b_l, c_l, states)
        ddt.addcmul_(s, u_l)
        if dt_raw is not None:
            ddt.mul_(torch.sigmoid(dt_raw))
        du = torch.empty_strided(u_like.shape, u_like.stride(), dtype=u_dt, device=s.device)
        if D is not None:  # du = s dt + D dy, the transpose fused into the last op
            torch.addcmul(s.mul_(dt), dy, D.to(ct), out=du.permute(2, 0, 1))
        else:
            torch.mul(s, dt, out=du.permute(2, 0, 1))
        return (
            du,
            _grad_like(delta_like, ddt, delta_dt),
            dA.t().to(a_dt),
            _grad_like(b_like, dB, b_dt),
            _grad_like(c_like, dC, c_dt),
            (dy * u_l).sum((0, 1)).to(d_dt) if D is not None else None,
            dz,
            ddt.sum((0, 1)).to(bias_dt) if delta_bias is not None else None,
            None,
        )


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, D, L), got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f"A must be real (D, N) with D={dim}, got {tuple(A.shape)} {A.dtype}")
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, A.shape[1], length):
            raise ValueError(f"{name} must be (B, N, L) = {(batch, A.shape[1], length)}, got {tuple(t.shape)}")
    for name, t, shape in (("D", D, (dim,)), ("delta_bias", delta_bias, (dim,)), ("z", z, u.shape)):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch selective scan (any device), differentiable in every tensor argument.

    Args:
        u, delta: (B, D, L). A: (D, N). B, C: (B, N, L). D, delta_bias: (D,). z: (B, D, L) gate.
    Returns:
        (B, D, L) in u's dtype: y * silu(z) if z is given, else y.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Selective scan with `selective_scan_fn` semantics: the CUDA kernel when usable, else `selective_scan_ref`.

    Args/returns as `selective_scan_ref`: u, delta, z (B, D, L); A (D, N); B, C (B, N, L); D, delta_bias (D,)
    -> (B, D, L).
    """
    kernels = _kernels.select(u.device)
    if kernels is None:
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return kernels.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
