"""One GPU check for a lent machine (one H200, 10 minutes a command, no internet, no Ray / MLflow / pip index).

Builds the pinned kernels for the GPU's architecture, runs the GPU parity tests and the CUDA benchmarks, and writes
one JSON report and one table (`report.json`, `report.txt`, plus phase logs) to --out.

    python3 scripts/gpu_check.py --out "$OUT"     # on the GPU machine; carry .whl/ (the pinned sdists)
    python3 scripts/gpu_check.py --dry-run        # on CPU: everything but compiling and running CUDA
    make gpu-check

Phases, each in its own process with a timeout from the remaining --budget-s; the report is rewritten after each, so
a run cut short still reports what it measured:
  env     torch / CUDA / GPU / nvcc / ninja / cores, and the bf16 8192^3 matmul rate (the practical ceiling)
  build   scripts/gpu_build.py, both extensions at once: sm_XY only, fp32 + bf16, MAX_JOBS = cores; cached in --work
          (a build cut short resumes there: rerun with --phases build ... on the same machine)
  tests   pytest -m gpu tests/ops tests/models/test_arm.py: kernels vs reference ops, outputs and gradients
  scan    benchmarks/scan.py --device cuda --skip-cpu: our scan vs the kernel, fp32 and bf16
  train   benchmarks/train_step.py --device cuda: arm_base pretrain (192 px) / finetune (224 px), bf16 autocast:
          img/s, peak memory, MFU = model FLOPs (benchmarks/flops.py) / 989 TFLOP/s (H100/H200 dense bf16 peak)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "benchmarks")]
import gpu_build  # noqa: E402
import gpu_report  # noqa: E402

PHASES = ("env", "build", "tests", "scan", "train")
TIMEOUTS = {"env": 60, "build": 330, "tests": 150, "scan": 90, "train": 180}
"""Default per-phase limits (s); each is also capped by what the budget leaves after the later phases' MINIMUMS."""
MINIMUMS = {"env": 10, "build": 60, "tests": 45, "scan": 30, "train": 60}
GPU_TESTS = ("tests/ops", "tests/models/test_arm.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check", help="report folder ($OUT there)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "gpu_build", help="build folder (kept: cache)")
    parser.add_argument("--sdists", type=Path, default=REPO / ".whl", help="folder with the pinned sdists")
    parser.add_argument("--arch", default=None, help="compute capability to build for (default: the GPU's, or 9.0)")
    parser.add_argument("--budget-s", type=float, default=570.0, help="wall-clock budget of the whole check")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps per row")
    parser.add_argument("--build-timeout-s", type=float, default=TIMEOUTS["build"], help="limit of the build phase")
    parser.add_argument("--dry-run", action="store_true", help="CPU: prepare sources, collect tests, parse args")
    args = parser.parse_args(argv)
    if args.budget_s <= 0 or args.train_steps <= 0:
        parser.error("--budget-s and --train-steps must be positive")
    return args


class Clock:
    """Remaining budget, and per-phase timeouts that leave the later phases their minimum."""

    def __init__(self, budget_s: float, phases: list[str], limits: dict[str, float] | None = None) -> None:
        self.deadline, self.phases, self.limits = time.monotonic() + budget_s, phases, {**TIMEOUTS, **(limits or {})}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, phase: str) -> float:
        later = self.phases[self.phases.index(phase) + 1 :]
        return min(self.limits[phase], self.remaining() - sum(MINIMUMS[p] for p in later))


def child_env(work: Path) -> dict[str, str]:
    """Environment of the phase processes: repo, built extensions and the pinned Python packages importable."""
    path = [str(REPO), *gpu_build.python_path(work), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "PYTHONUNBUFFERED": "1"}


def run(argv: list[str], env: dict[str, str], timeout: float, log: Path) -> dict:
    """Run argv (its own process group), appending output to `log`; {"rc", "seconds", "timed_out", "tail"}."""
    start = time.monotonic()
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(argv)}\n")
        fh.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=max(1.0, timeout)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    tail = log.read_text(errors="replace")[-1500:]
    return {"rc": rc, "seconds": round(time.monotonic() - start, 1), "timed_out": timed_out, "tail": tail}


def gpu_facts() -> dict:
    """Machine facts; with CUDA also the GPU and the best of 10 bf16 8192^3 matmuls in TFLOP/s."""
    import torch  # noqa: PLC0415

    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    facts = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
        "nvcc": _first_line([str(nvcc), "--version"], "release", r"release ([\d.]+)"),
        "ninja": _first_line(["ninja", "--version"]),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count)
        facts.update(memory_gib=round(props.total_memory / 2**30, 1), matmul_bf16_tflops=_matmul_tflops(torch))
    return facts


def _first_line(argv: list[str], contains: str = "", pattern: str = r"(.+)") -> str | None:
    """`pattern`'s group 1 in the first output line of argv containing `contains`; None when it cannot run."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = next((line.strip() for line in out.splitlines() if contains in line), "")
    m = re.search(pattern, line)
    return m[1] if m else None


def _matmul_tflops(torch, n: int = 8192, repeats: int = 10) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return round(2 * n**3 / best / 1e12, 1)


def phase_build(args, env: dict[str, str], clock: Clock) -> dict:
    """Both extensions in parallel processes (or the cache); per-extension and wall seconds."""
    records = {e.name: _cached(args.work, e.name, args.arch) for e in gpu_build.EXTENSIONS}
    todo = [name for name, rec in records.items() if rec is None]
    base = [sys.executable, "scripts/gpu_build.py", "--sdists", str(args.sdists), "--work", str(args.work)]
    base += ["--arch", args.arch] + (["--dry-run"] if args.dry_run else [])
    start, timeout = time.monotonic(), clock.timeout("build")
    logs = {name: args.out / f"build_{name}.log" for name in todo}
    with contextlib.ExitStack() as stack:
        procs = {name: _spawn([*base, "--ext", name], env, stack.enter_context(logs[name].open("w"))) for name in todo}
        results = {name: _finish(proc, start + timeout) for name, proc in procs.items()}
    for name in todo:
        records[name] = _last_json(logs[name]) or {"name": name, "built": False}
        records[name].update(results[name])
        if results[name]["rc"] or results[name]["timed_out"]:
            records[name]["tail"] = logs[name].read_text(errors="replace")[-1500:]
    ok = all(r.get("rc", 0) == 0 and not r.get("timed_out") for r in records.values())
    status = "dry-run" if args.dry_run and ok else ("ok" if ok else "failed")
    return {"status": status, "seconds": round(time.monotonic() - start, 1), "extensions": records}


def _cached(work: Path, name: str, arch: str) -> dict | None:
    """The build record of a usable earlier build of `name` (same pins, arch and torch), else None."""
    record_path, library = work / "ext" / f"{name}.json", work / "ext" / f"{name}.so"
    if not (record_path.is_file() and library.exists()):
        return None
    import torch  # noqa: PLC0415

    record = json.loads(record_path.read_text())
    ext = next(e for e in gpu_build.EXTENSIONS if e.name == name)
    want = {"dist": f"{ext.dist}=={gpu_build.pinned_versions()[ext.dist]}", "arch": arch, "torch": torch.__version__}
    return {**record, "cached": True} if all(record.get(k) == v for k, v in want.items()) else None


def _spawn(argv: list[str], env: dict[str, str], log) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, deadline: float) -> dict:
    try:
        return {"rc": proc.wait(timeout=max(1.0, deadline - time.monotonic())), "timed_out": False}
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return {"rc": proc.wait(), "timed_out": True}


def _last_json(log: Path) -> dict | None:
    """The last line of `log` that parses as a JSON object (gpu_build.py prints its record so)."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def phase_tests(args, env: dict[str, str], clock: Clock) -> dict:
    """The gpu-marked tests (dry run: only collected); counts and failures from the JUnit XML."""
    junit = args.work / "junit_gpu.xml"
    junit.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=", "-rs", *GPU_TESTS]
    argv += ["--collect-only", "-q"] if args.dry_run else ["-q", f"--junitxml={junit}"]
    result = run(argv, env, clock.timeout("tests"), args.out / "tests.log")
    counts = gpu_report.junit_counts(ET.parse(junit)) if junit.is_file() else {}
    if args.dry_run:
        counts["collected"] = gpu_report.collected_count(result["tail"])
    ok = result["rc"] == 0 and not result["timed_out"]
    status = ("dry-run" if args.dry_run else "ok") if ok else "failed"
    if status == "ok" and counts.get("skipped"):
        status = "incomplete"  # e.g. the kernels did not build: the parity tests skipped
    return {"status": status, **result, **counts}


def phase_bench(args, env: dict[str, str], clock: Clock, name: str) -> dict:
    """benchmarks/scan.py or benchmarks/train_step.py on CUDA, rows read back from their --json (dry run: parsed)."""
    rows_path = args.work / f"{name}_rows.json"
    if name == "scan":
        argv = ["benchmarks/scan.py", "--device", "cuda", "--skip-cpu", "--json", str(rows_path)]
    else:
        argv = ["benchmarks/train_step.py", "--device", "cuda", "--steps", str(args.train_steps)]
        argv += ["--json", str(rows_path)]
    if args.dry_run:
        return {"status": "dry-run", "argv": argv, **gpu_report.dry_bench(name, argv[1:])}
    rows_path.unlink(missing_ok=True)
    result = run([sys.executable, *argv], env, clock.timeout(name), args.out / "bench.log")
    rows = json.loads(rows_path.read_text()) if rows_path.is_file() else []
    ok = result["rc"] == 0 and not result["timed_out"] and bool(rows)
    return {"status": "ok" if ok else "failed", **result, "rows": rows}


def phase_env(args, env: dict[str, str], clock: Clock) -> dict:
    """Machine facts in a child process (CUDA is initialised there, not here); dry run: also the import check."""
    code = "import json, gpu_check; print(json.dumps(gpu_check.gpu_facts()))"
    env = {**env, "PYTHONPATH": os.pathsep.join([str(REPO / "scripts"), env["PYTHONPATH"]])}
    result = run([sys.executable, "-c", code], env, clock.timeout("env"), args.out / "env.log")
    facts = _last_json(args.out / "env.log") or {}
    if args.arch is None:
        args.arch = facts.get("capability") or "9.0"
    out = {"status": "ok" if result["rc"] == 0 else "failed", **result, "facts": facts, "arch": args.arch}
    if args.dry_run:
        out["imports_without_ray_mlflow"] = run(
            [sys.executable, "-c", gpu_report.import_check_code()], env, 120, args.out / "env.log"
        )
        out["status"] = "dry-run" if result["rc"] == 0 and out["imports_without_ray_mlflow"]["rc"] == 0 else "failed"
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the phases; returns 0 when every phase passed (dry run: every preparation passed)."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget_s, args.phases, {"build": args.build_timeout_s})
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    report = {"started": started, "dry_run": args.dry_run, "pins": gpu_build.pinned_versions(), "phases": {}}
    runners = {"env": phase_env, "build": phase_build, "tests": phase_tests}
    for phase in args.phases:
        if phase != "env" and args.arch is None:
            args.arch = "9.0"
        if clock.timeout(phase) < MINIMUMS[phase] / 2:
            report["phases"][phase] = {"status": "skipped", "reason": f"{clock.remaining():.0f} s of budget left"}
        elif phase in runners:
            report["phases"][phase] = runners[phase](args, child_env(args.work), clock)
        else:
            report["phases"][phase] = phase_bench(args, child_env(args.work), clock, phase)
        gpu_report.write(report, args.out)
        print(f"[gpu_check] {phase}: {report['phases'][phase]['status']}", flush=True)
    print(gpu_report.format_table(report))
    good = {"ok", "dry-run"}
    return 0 if all(p["status"] in good for p in report["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
