"""Pretraining step throughput: images/s of forward + backward + AdamW step.

CPU: tiny and small ARM with our scan (ops backend "ref", the fast pure-PyTorch scan) vs the stock mamba-ssm
reference loop (`benchmarks/scan.py`'s copy, or a naive per-step loop if that file is absent).
CUDA (--device cuda): arm_base pretraining img/s and peak memory in bf16 autocast (ops backend "auto": kernels
when installed).

    python benchmarks/train_step.py                  # CPU table
    python benchmarks/train_step.py --device cuda    # arm_base on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from arm_platform import ops, recipes
from arm_platform.models import build_model
from arm_platform.train.engine import train_one_epoch
from arm_platform.train.optim import build_optimizer
from arm_platform.train.schedule import Schedule
from arm_platform.train.tasks import PretrainTask

inner_ops = importlib.import_module("arm_platform.ops.mamba_inner")  # the module (ops.mamba_inner is the function)
CPU_CASES = [("tiny", 32), ("small", 4)]  # (size, batch)


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


def step_img_per_s(size: str, batch: int, device: str, steps: int, warmup: int = 1) -> tuple[float, float]:
    """(img/s, peak GPU memory GiB or 0) of pretraining steps of the `size` recipe's model on random images."""
    cfg = recipes.get(f"pretrain_{size}")
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=batch))
    model = build_model(cfg.model, "pretrain").to(device)
    opt = build_optimizer(model, cfg.optim, "pretrain")
    task = PretrainTask(model)
    sched = Schedule(peak_lr=1e-4, min_lr=1e-4, warmup_steps=0, total_steps=10**6)
    img = cfg.model.img_size
    batches = [{"image": torch.randn(batch, 3, img, img, device=device)} for _ in range(warmup + steps)]
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


def cpu_table(steps: int) -> None:
    ops.set_backend("ref")
    ref_name, ref_fn = reference_loop()
    print(f"CPU, {torch.get_num_threads()} threads; reference: {ref_name}")
    print(f"{'model':<8}{'batch':>6}{'ours img/s':>12}{'loop img/s':>12}{'speedup':>9}")
    for size, batch in CPU_CASES:
        ours, _ = step_img_per_s(size, batch, "cpu", steps)
        with scan_impl(ref_fn):
            loop, _ = step_img_per_s(size, batch, "cpu", max(1, steps // 2))
        print(f"{size:<8}{batch:>6}{ours:>12.1f}{loop:>12.2f}{ours / loop:>8.1f}x")


def cuda_table(steps: int, batch: int) -> None:
    print(f"{torch.cuda.get_device_name()}, ops backend {ops.active_backend('cuda')}, bf16 autocast")
    img_s, peak = step_img_per_s("base", batch, "cuda", steps, warmup=2)
    print(f"arm_base_pz16 pretrain batch {batch}: {img_s:.1f} img/s, peak memory {peak:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64, help="CUDA batch size (arm_base)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.device == "cuda":
        cuda_table(args.steps, args.batch)
    else:
        cpu_table(args.steps)


if __name__ == "__main__":
    main()
