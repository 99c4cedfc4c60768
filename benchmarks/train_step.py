"""Training step throughput: images/s of forward + backward + AdamW step.

CPU: tiny and small ARM pretraining with our scan (ops backend "ref", the fast pure-PyTorch scan) vs the stock
mamba-ssm reference loop (`benchmarks/scan.py`'s copy, or a naive per-step loop if that file is absent).
CUDA (--device cuda): arm_base pretraining (192 px) and finetuning (224 px) at the recipes' per-GPU batch in bf16
autocast (ops backend "auto": the kernels when installed): img/s, peak memory and model FLOPs utilisation (MFU, the
analytic FLOPs of `benchmarks/flops.py` over the H200 / H100 dense bf16 peak, 989 TFLOP/s).

    python benchmarks/train_step.py                                  # CPU table
    python benchmarks/train_step.py --before-after --steps 3         # old vs current scan, 1 and 2 threads
    python benchmarks/train_step.py --device cuda --json out.json    # arm_base on a GPU

--before-after times the step with `scan_before.scan_before` (the selective scan as it was before the blocked rewrite,
kept in benchmarks/scan_before.py) against the current `selective_scan_ref`: the best of --rounds alternating
rounds of --steps steps each, batch 64, fp32.
Measured on this 2-core machine (shared, so +-10% between runs); --steps 3 --rounds 3, img/s before -> after:
    recipe           threads   run 1 (12-02 02:40)        run 2 (12-02 03:32, quiet)
    pretrain_tiny          1   56.1 ->  64.8  1.16x       57.0 ->  61.0  1.07x
    finetune_tiny          1   21.9 ->  25.2  1.15x       22.3 ->  23.9  1.07x
    pretrain_tiny          2   90.6 ->  94.0  1.04x       93.3 -> 110.9  1.19x
    finetune_tiny          2   32.2 ->  36.4  1.13x       36.1 ->  36.6  1.01x
    (a third run gave 1.08x / 1.13x / 1.15x / 1.17x for the same rows): 1.01-1.19x, about 1.1x.
Inside the finetune_tiny step (1 thread) the 24 scan calls went from about 2.2-2.5 s to 1.9-2.1 s per step; the
rest (in_proj / x_proj / out_proj matmuls, conv, flips and the v3 column permutation) is unchanged at about 1.1 s.
Tried and not kept: saving h and exp(dt A) in the forward (skips the backward's recompute) is 25-30% slower per call
without a memory pool (page faults on 68 MB of fresh memory per call) and at most ~3% faster with one (1.6 GB held by
finetune_tiny's 24 calls); blocks of 2-8 time steps instead of 1 (no better at 1 or 2 threads); splitting the batch
into 2-8 groups (slower); batched matvec vs multiply + sum for dB / dC (a wash).
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

from arm_platform import ops, recipes
from arm_platform.models import build_model
from arm_platform.train.engine import train_one_epoch
from arm_platform.train.optim import build_optimizer
from arm_platform.train.schedule import Schedule
from arm_platform.train.tasks import build_task

sys.path.insert(0, str(Path(__file__).parent))
import flops  # noqa: E402  (benchmarks/flops.py)
from scan_before import scan_before  # noqa: E402  (benchmarks/scan_before.py: the old scan, for --before-after)

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
