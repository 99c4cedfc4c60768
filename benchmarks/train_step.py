"""Training step throughput: images/s of forward + backward + AdamW step.

CPU: tiny and small ARM pretraining with our scan (ops backend "ref", the fast pure-PyTorch scan) vs the stock
mamba-ssm reference loop (`benchmarks/scan.py`'s copy, or a naive per-step loop if that file is absent).
CUDA (--device cuda): arm_base pretraining (192 px) and finetuning (224 px) at the recipes' per-GPU batch in bf16
autocast (ops backend "auto": the kernels when installed): img/s, peak memory and model FLOPs utilisation (MFU, the
analytic FLOPs of `benchmarks/flops.py` over the H200 / H100 dense bf16 peak, 989 TFLOP/s).

    python benchmarks/train_step.py                                  # CPU table
    python benchmarks/train_step.py --before-after --steps 3         # old vs current scan, 1 and 2 threads
    python benchmarks/train_step.py --device cuda --json out.json    # arm_base on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from arm_platform import ops, recipes
from arm_platform.models import build_model
from arm_platform.train.engine import train_one_epoch
from arm_platform.train.optim import build_optimizer
from arm_platform.train.schedule import Schedule
from arm_platform.train.tasks import build_task

sys.path.insert(0, str(Path(__file__).parent))
import flops  # noqa: E402  (benchmarks/flops.py)

inner_ops = importlib.import_module("arm_platform.ops.mamba_inner")  # the module (ops.mamba_inner is the function)
CPU_CASES = [("tiny", 32), ("small", 4)]  # (size, batch)
CUDA_TASKS = ("pretrain", "finetune")


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Per-timestep recurrence h = exp(dt A) h + dt B u, y = C h (+ D u) * silu(z); (B, D, L) in and out."""
    dtype = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None].float()
    if delta_softplus:
        delta = torch.nn.functional.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t].float() * u[:, :, t, None]
        ys.append((h * C[:, None, :, t].float()).sum(-1))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D[None, :, None]
    if z is not None:
        y = y * torch.nn.functional.silu(z.float())
    return y.to(dtype)


# --------------------------------------------------------------------------------------------------------------------
# The scan before the blocked rewrite (arm_platform/ops/selective_scan.py at 8c73e45), kept here only to measure the
# speed-up (--before-after): (L, B, N, D) work in 1M-element chunks, exp(dt A) and h recomputed in the backward with
# fresh buffers per call, separate transpose copies in and out.


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


def reference_loop() -> tuple[str, Callable]:
    """(name, scan) of the stock reference loop: benchmarks/scan.py's copy when present, else `naive_scan`."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from scan import stock_selective_scan_ref  # noqa: PLC0415

        return "mamba-ssm selective_scan_ref loop", stock_selective_scan_ref
    except ImportError:
        return "naive loop", naive_scan


@contextlib.contextmanager
def scan_impl(fn: Callable | None) -> Iterator[None]:
    """Route the pure-PyTorch Mamba path through `fn` (None: our scan)."""
    original = inner_ops.selective_scan_ref
    if fn is not None:
        inner_ops.selective_scan_ref = fn
    try:
        yield
    finally:
        inner_ops.selective_scan_ref = original


def _step_parts(recipe: str, batch: int, device: str):
    """(cfg, task, optimizer, schedule) of one recipe's training step at `batch`, model on `device`."""
    cfg = recipes.get(recipe)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=batch))
    model = build_model(cfg.model, cfg.task).to(device)
    opt = build_optimizer(model, cfg.optim, cfg.task)
    sched = Schedule(peak_lr=1e-4, min_lr=1e-4, warmup_steps=0, total_steps=10**6)
    return cfg, build_task(cfg, model), opt, sched


def _batches(cfg, batch: int, device: str, count: int) -> list[dict[str, torch.Tensor]]:
    img, classes = cfg.model.img_size, cfg.model.num_classes
    return [
        {
            "image": torch.randn(batch, 3, img, img, device=device),
            "label": torch.randint(classes, (batch,), device=device),
        }
        for _ in range(count)
    ]


def step_img_per_s(recipe: str, batch: int, device: str, steps: int, warmup: int = 1) -> tuple[float, float]:
    """(img/s, peak GPU memory GiB or 0) of `steps` training steps of `recipe`'s model on random images.

    The peak covers the timed steps only (optimizer state already allocated by the warm-up step).
    """
    cfg, task, opt, sched = _step_parts(recipe, batch, device)
    batches = _batches(cfg, batch, device, warmup + steps)
    train_one_epoch(task, batches[:warmup], opt, sched, start_step=0, max_steps=warmup, clip_grad=3.0)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_one_epoch(
        task, batches[warmup:], opt, sched, start_step=warmup, max_steps=steps, clip_grad=3.0, precision=cfg.precision
    )
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return batch * steps / elapsed, peak


def measure(recipe: str, batch: int, device: str, steps: int, warmup: int) -> dict:
    """One row of the CUDA table: throughput, memory and MFU of `recipe`'s training step."""
    cfg = recipes.get(recipe)
    img_s, peak = step_img_per_s(recipe, batch, device, steps, warmup)
    train_flops = flops.train_step_per_image(cfg.model, cfg.task)
    return {
        "recipe": recipe,
        "model": cfg.model.name,
        "task": cfg.task,
        "img_size": cfg.model.img_size,
        "batch": batch,
        "precision": cfg.precision if device == "cuda" else "fp32",
        "ops_backend": ops.active_backend(device),
        "steps": steps,
        "img_per_s": img_s,
        "step_ms": 1e3 * batch / img_s,
        "peak_mem_gib": peak,
        "train_gflop_per_img": train_flops / 1e9,
        "achieved_tflops": img_s * train_flops / 1e12,
        "mfu": flops.mfu(img_s, train_flops),
        "peak_tflops": flops.H200_BF16_DENSE_PEAK / 1e12,
    }


def cpu_table(steps: int) -> None:
    ops.set_backend("ref")
    ref_name, ref_fn = reference_loop()
    print(f"CPU, {torch.get_num_threads()} threads; reference: {ref_name}")
    print(f"{'model':<8}{'batch':>6}{'ours img/s':>12}{'loop img/s':>12}{'speedup':>9}")
    for size, batch in CPU_CASES:
        ours, _ = step_img_per_s(f"pretrain_{size}", batch, "cpu", steps)
        with scan_impl(ref_fn):
            loop, _ = step_img_per_s(f"pretrain_{size}", batch, "cpu", max(1, steps // 2))
        print(f"{size:<8}{batch:>6}{ours:>12.1f}{loop:>12.2f}{ours / loop:>8.1f}x")


BEFORE_AFTER_RECIPES = ("pretrain_tiny", "finetune_tiny")


def before_after_table(batch: int, threads: list[int], steps: int, rounds: int) -> list[dict]:
    """img/s of a CPU training step with `scan_before` (the old scan) vs the current one, per recipe and thread count.

    Each (recipe, threads) pair runs `rounds` alternating before/after measurements of `steps` steps; the best of each
    side counts (the 2-core box is shared, so the fastest round is the least disturbed one).
    """
    ops.set_backend("ref")
    print(f"CPU training step, batch {batch}: old scan (scan_before) vs current selective_scan_ref")
    print(f"{'recipe':<16}{'threads':>8}{'before img/s':>14}{'after img/s':>13}{'ratio':>8}", flush=True)
    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for recipe in BEFORE_AFTER_RECIPES:
            best = {"before": 0.0, "after": 0.0}
            for _ in range(rounds):
                for side, fn in (("before", scan_before), ("after", None)):
                    with scan_impl(fn):
                        best[side] = max(best[side], step_img_per_s(recipe, batch, "cpu", steps)[0])
            rows.append({"recipe": recipe, "threads": n_threads, **best, "ratio": best["after"] / best["before"]})
            r = rows[-1]
            print(f"{recipe:<16}{n_threads:>8}{r['before']:>14.1f}{r['after']:>13.1f}{r['ratio']:>7.2f}x", flush=True)
    return rows


def format_rows(rows: list[dict]) -> str:
    """Fixed-width table of `measure` rows."""
    head = f"{'recipe':<16}{'img':>5}{'batch':>6}{'ops':>7}{'img/s':>10}{'step ms':>9}{'peak GiB':>9}"
    head += f"{'GFLOP/img':>10}{'TFLOP/s':>9}{'MFU':>7}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['recipe']:<16}{r['img_size']:>5}{r['batch']:>6}{r['ops_backend']:>7}{r['img_per_s']:>10.1f}"
            f"{r['step_ms']:>9.1f}{r['peak_mem_gib']:>9.2f}{r['train_gflop_per_img']:>10.1f}"
            f"{r['achieved_tflops']:>9.1f}{100 * r['mfu']:>6.1f}%"
        )
    return "\n".join(lines)


def cuda_table(args: argparse.Namespace, device: str = "cuda") -> list[dict]:
    """arm_base pretrain / finetune rows on the GPU (recipe batch unless --batch); `device` is "cuda" but in tests."""
    peak = flops.H200_BF16_DENSE_PEAK / 1e12
    name = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"{name}, ops backend {ops.active_backend(device)}, bf16 autocast")
    print(f"MFU over {peak:.0f} TFLOP/s (H100/H200 dense bf16), train FLOPs = 3 x forward (benchmarks/flops.py)")
    rows = []
    for task in args.task:
        recipe = f"{task}_{args.size}"
        batch = args.batch or recipes.get(recipe).optim.batch_size
        rows.append(measure(recipe, batch, device, args.steps, args.warmup))
        if device == "cuda":
            torch.cuda.empty_cache()
        table = format_rows(rows)
        print(table if len(rows) == 1 else table.splitlines()[-1], flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 4 on CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (CUDA)")
    parser.add_argument("--task", nargs="+", choices=CUDA_TASKS, default=list(CUDA_TASKS), help="CUDA rows")
    parser.add_argument("--size", default="base", help="CUDA: recipe size (pretrain_SIZE / finetune_SIZE)")
    parser.add_argument("--batch", type=int, default=None, help="CUDA batch size (default: the recipe's per-GPU)")
    parser.add_argument("--json", type=Path, default=None, help="CUDA: also write the rows as JSON here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--before-after",
        nargs="*",
        type=int,
        metavar="THREADS",
        default=None,
        help="CPU: old vs current scan on pretrain_tiny / finetune_tiny at --batch (64) for these thread counts (1 2)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="--before-after: alternating rounds, best one counts")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 10 if args.device == "cuda" else 4
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.before_after is not None:
        before_after_table(args.batch or 64, args.before_after or [1, 2], args.steps, args.rounds)
        return
    if args.device == "cpu":
        cpu_table(args.steps)
        return
    rows = cuda_table(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
