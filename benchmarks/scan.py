"""Selective-scan benchmark: our `selective_scan_ref` vs a copy of mamba-ssm's reference loop (and the CUDA kernel).

Shapes: B batch, D channels (d), L length, N state. Inputs as in a Mamba block: D skip, z gate, delta_bias, softplus.
The stock reference takes seconds per call, so it is timed once and only at d=768, L=196 unless --ref-all.

    python benchmarks/scan.py                 # CPU table, 2 threads
    python benchmarks/scan.py --device cuda   # also our scan on CUDA and the mamba-ssm kernel (fp32 and bf16)
    python benchmarks/scan.py --device cuda --skip-cpu --json rows.json   # the CUDA table only, as JSON
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from arm_platform.ops import _kernels, selective_scan_ref  # noqa: E402

SIZES = [(8, 384, 128, 16), (8, 384, 196, 16), (8, 768, 128, 16), (8, 768, 196, 16)]  # (B, d, L, N)
TARGET = (768, 196, 70.0)  # d, L, minimum fwd+bwd speedup over the stock reference


def stock_selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Copy of mamba-ssm's `selective_scan_ref` (mamba_ssm/ops/selective_scan_interface.py), real A, B/C (B, N, L).

    Einsum-built exp(delta A) and delta B u, a Python loop with one einsum per step, autograd through all of it.
    """
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    B = B.float()
    C = C.float()
    x = A.new_zeros((batch, dim, dstate))
    ys = []
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        ys.append(y)
    y = torch.stack(ys, dim=2)  # (batch dim L)
    out = y if D is None else y + u * rearrange(D, "d -> d 1")
    if z is not None:
        out = out * F.silu(z)
    return out.to(dtype=dtype_in)


def make_inputs(batch: int, dim: int, length: int, n_state: int, device: str) -> list[torch.Tensor]:
    """(u, delta, A, B, C, D, z, delta_bias) with requires_grad, values as in a trained Mamba block."""
    kw = {"device": device}
    tensors = [
        torch.randn(batch, dim, length, **kw),
        0.5 * torch.randn(batch, dim, length, **kw),
        -torch.arange(1, n_state + 1, dtype=torch.float32, **kw).repeat(dim, 1),
        torch.randn(batch, n_state, length, **kw),
        torch.randn(batch, n_state, length, **kw),
        torch.ones(dim, **kw),
        torch.randn(batch, dim, length, **kw),
        torch.rand(dim, **kw) * 4.6 - 6.9,  # softplus^-1 of dt in [1e-3, 1e-1], Mamba's dt init
    ]
    return [t.requires_grad_() for t in tensors]


def time_ms(fn: Callable[[], object], repeats: int, device: str, warmup: bool = True) -> float:
    """Best wall-clock ms over `repeats` calls (the minimum is the least disturbed by other processes)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return min(times)


def fwd_and_fwdbwd(scan: Callable, inputs: list[torch.Tensor], repeats: int, device: str, warmup: bool = True):
    """Best-of-`repeats` ms of a no-grad forward and of forward + backward."""

    def fwd():
        with torch.no_grad():
            scan(*inputs, delta_softplus=True)

    def fwdbwd():
        out = scan(*inputs, delta_softplus=True)
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return time_ms(fwd, repeats, device, warmup), time_ms(fwdbwd, repeats, device, warmup)


def stock_fwdbwd(inputs: list[torch.Tensor]) -> None:
    """Forward + backward of the stock reference loop."""
    out = stock_selective_scan_ref(*inputs, delta_softplus=True)
    torch.autograd.grad(out, inputs, torch.ones_like(out))


def check_agreement(inputs: list[torch.Tensor]) -> float:
    """Max |ours - stock| output difference (sanity check that both compute the same scan)."""
    with torch.no_grad():
        return (
            (selective_scan_ref(*inputs, delta_softplus=True) - stock_selective_scan_ref(*inputs, delta_softplus=True))
            .abs()
            .max()
        )


def cpu_table(args: argparse.Namespace) -> bool:
    """Print the CPU table; return whether the speedup target holds."""
    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats} runs")
    print(f"{'B':>3} {'d':>5} {'L':>5} {'N':>3} | {'ours fwd':>9} {'ours f+b':>9} | {'stock f+b':>10} {'speedup':>8}")
    ok = True
    for batch, dim, length, n_state in SIZES:
        inputs = make_inputs(batch, dim, length, n_state, "cpu")
        fwd, fwdbwd = fwd_and_fwdbwd(selective_scan_ref, inputs, args.repeats, "cpu")
        stock, ratio = "-", ""
        if args.ref_all or (dim, length) == TARGET[:2]:
            # the stock loop takes seconds: one fwd+bwd, no warm-up (it is dominated by the loop itself)
            stock_ms = time_ms(functools.partial(stock_fwdbwd, inputs), 1, "cpu", warmup=False)
            stock, ratio = f"{stock_ms:10.1f}", f"{stock_ms / fwdbwd:7.1f}x"
            if (dim, length) == TARGET[:2]:
                ok = stock_ms / fwdbwd >= TARGET[2]
        print(f"{batch:>3} {dim:>5} {length:>5} {n_state:>3} | {fwd:9.1f} {fwdbwd:9.1f} | {stock:>10} {ratio:>8}")
    diff = check_agreement(make_inputs(8, 384, 128, 16, "cpu"))
    print(f"max |ours - stock| output difference at d=384, L=128: {diff:.2e}")
    print(f"target: fwd+bwd >= {TARGET[2]:.0f}x faster than the stock loop at d={TARGET[0]}, L={TARGET[1]}: "
          f"{'met' if ok else 'NOT met'}")  # fmt: skip
    return ok


def to_dtype(inputs: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The activations (u, delta, B, C, z) in `dtype`, as under bf16 autocast; A, D, delta_bias stay fp32."""
    return [t.detach().to(dtype if t.dim() == 3 else t.dtype).requires_grad_() for t in inputs]


def kernel_cells(kernel_fn: Callable, inputs: list[torch.Tensor], repeats: int, device: str) -> dict:
    """Kernel fwd / fwd+bwd ms and its max |kernel - ours| output difference."""
    fwd, fwdbwd = fwd_and_fwdbwd(kernel_fn, inputs, repeats, device)
    with torch.no_grad():
        kernel, ours = (fn(*inputs, delta_softplus=True).float() for fn in (kernel_fn, selective_scan_ref))
    return {"kernel_fwd_ms": fwd, "kernel_fwdbwd_ms": fwdbwd, "max_abs_diff": (kernel - ours).abs().max().item()}


def cuda_table(args: argparse.Namespace, device: str = "cuda") -> list[dict]:
    """Our scan on CUDA and the mamba-ssm kernel (when available), fp32 and bf16 activations; returns the rows.

    `device` is "cuda" but for tests, which drive the same code on CPU tensors.
    """
    if device == "cuda" and not torch.cuda.is_available():
        print("\n--device cuda: CUDA is not available, skipped")
        return []
    kernels, reason = _kernels.load_kernels()
    print(f"\n{torch.cuda.get_device_name() if device == 'cuda' else device}: kernels: {reason}")
    print(f"{'B':>3} {'d':>5} {'L':>5} {'N':>3} {'dtype':>5} | {'ours fwd':>9} {'ours f+b':>9} | "
          f"{'kern fwd':>9} {'kern f+b':>9} {'max diff':>9}")  # fmt: skip
    rows = []
    for (batch, dim, length, n_state), dtype in itertools.product(SIZES, (torch.float32, torch.bfloat16)):
        inputs = to_dtype(make_inputs(batch, dim, length, n_state, device), dtype)
        row = {"B": batch, "d": dim, "L": length, "N": n_state, "dtype": str(dtype).removeprefix("torch.")}
        row["ours_fwd_ms"], row["ours_fwdbwd_ms"] = fwd_and_fwdbwd(selective_scan_ref, inputs, args.repeats, device)
        kern = ("-", "-", "-")
        if kernels is not None:
            row.update(kernel_cells(kernels.selective_scan_fn, inputs, args.repeats, device))
            kern = (f"{row['kernel_fwd_ms']:9.2f}", f"{row['kernel_fwdbwd_ms']:9.2f}", f"{row['max_abs_diff']:9.1e}")
        rows.append(row)
        print(f"{batch:>3} {dim:>5} {length:>5} {n_state:>3} {row['dtype'][:5]:>5} | {row['ours_fwd_ms']:9.2f} "
              f"{row['ours_fwdbwd_ms']:9.2f} | {kern[0]:>9} {kern[1]:>9} {kern[2]:>9}", flush=True)  # fmt: skip
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: also time on the GPU")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the CPU table")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (best reported)")
    parser.add_argument("--ref-all", action="store_true", help="time the stock loop at every size (slow)")
    parser.add_argument("--skip-cpu", action="store_true", help="with --device cuda: the CUDA table only")
    parser.add_argument("--json", type=Path, default=None, help="write the CUDA rows as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not (args.skip_cpu and args.device == "cuda"):
        cpu_table(args)
    if args.device == "cuda":
        rows = cuda_table(args)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
