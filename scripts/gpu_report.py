"""Report writing and dry-run helpers of scripts/gpu_check.py (no CUDA needed: tested on CPU).

The report is one JSON object: {"started", "dry_run", "pins", "phases": {env, build, tests, scan, train}}; each phase
has a "status" (ok, failed, incomplete, skipped, dry-run) and its measurements. `write` saves it as report.json and the
table of `format_table` as report.txt.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

PEAK_NOTE = "MFU = model FLOPs (benchmarks/flops.py, train = 3 x forward) / 989 TFLOP/s, H100/H200 SXM dense bf16 peak"
IMPORTED_ON_GPU = (
    "arm_platform.ops",
    "arm_platform.models",
    "arm_platform.recipes",
    "arm_platform.train.engine",
    "arm_platform.train.optim",
    "arm_platform.train.schedule",
    "arm_platform.train.tasks",
    "scan",
    "train_step",
    "flops",
    "gpu_build",
)
"""What the GPU phases import (tests aside: the dry run collects them)."""


def write(report: dict, out: Path) -> None:
    """report.json and report.txt in `out` (rewritten after every phase)."""
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.txt").write_text(format_table(report) + "\n")


def format_table(report: dict) -> str:
    """The human-readable report: header, one line per phase, then the scan and training tables."""
    phases = report.get("phases", {})
    lines = [_header(report), "", f"{'phase':<7}{'status':<11}{'seconds':>8}  note"]
    for name, phase in phases.items():
        seconds = phase.get("seconds")
        sec = f"{seconds:8.1f}" if isinstance(seconds, int | float) else f"{'-':>8}"
        lines.append(f"{name:<7}{phase.get('status', '?'):<11}{sec}  {_note(name, phase)}")
    scan_rows = phases.get("scan", {}).get("rows") or []
    if scan_rows:
        lines += [
            "",
            "selective scan, ms (best of 5): ours (pure PyTorch) vs the mamba-ssm kernel",
            *scan_table(scan_rows),
        ]
    train_rows = phases.get("train", {}).get("rows") or []
    if train_rows:
        lines += ["", "training step (forward + backward + AdamW), bf16 autocast", *train_table(train_rows), PEAK_NOTE]
    return "\n".join(lines)


def _header(report: dict) -> str:
    facts = report.get("phases", {}).get("env", {}).get("facts", {})
    gpu = f"{facts.get('gpu', 'no GPU')} (sm {facts.get('capability', '-')})"
    pins = ", ".join(f"{k}=={v}" for k, v in report.get("pins", {}).items())
    mode = " DRY RUN" if report.get("dry_run") else ""
    return (
        f"ARM GPU check{mode} {report.get('started', '')}: {gpu}, torch {facts.get('torch', '?')}, "
        f"CUDA {facts.get('cuda_runtime', '?')}, nvcc {facts.get('nvcc') or 'missing'}, {facts.get('cpu_cores', '?')} "
        f"cores; {pins}"
    )


def _note(name: str, phase: dict) -> str:
    if phase.get("status") == "skipped":
        return phase.get("reason", "")
    if phase.get("timed_out"):
        return "timed out"
    if name == "env":
        tflops = phase.get("facts", {}).get("matmul_bf16_tflops")
        imports = phase.get("imports_without_ray_mlflow")
        if imports:
            return f"phase imports without {'/'.join(BLOCKED)}: {'ok' if imports['rc'] == 0 else 'FAILED'}"
        return f"bf16 matmul 8192^3: {tflops} TFLOP/s; build arch {phase.get('arch')}" if tflops else ""
    if "planned" in phase:
        cells = ((r["recipe"], r["img_size"], r["batch"], r["train_gflop_per_img"]) for r in phase["planned"])
        return "; ".join(f"{recipe} {img} px b{batch} {gflop} GFLOP/img" for recipe, img, batch, gflop in cells)
    if "sizes" in phase:
        return f"{len(phase['sizes'])} sizes x fp32/bf16"
    if name == "build":
        return "; ".join(_ext_note(r) for r in phase.get("extensions", {}).values())
    if name == "tests":
        keys = ("collected", "passed", "failed", "errors", "skipped")
        counts = ", ".join(f"{phase[k]} {k}" for k in keys if k in phase)
        failures = phase.get("failures", [])
        return counts + (f"; failed: {', '.join(failures[:5])}" if failures else "")
    return f"{len(phase.get('rows', []))} rows" if phase.get("rows") else ""


def _ext_note(record: dict) -> str:
    state = "cached (built in" if record.get("cached") else ("built in" if record.get("built") else "not built")
    seconds = f" {record['seconds']:.0f} s" + (")" if record.get("cached") else "") if record.get("built") else ""
    jobs = f", MAX_JOBS {record['max_jobs']}" if record.get("max_jobs") else ""
    return f"{record.get('name')} {state}{seconds} (sm {record.get('arch')}, fp32+bf16{jobs})"


def scan_table(rows: list[dict]) -> list[str]:
    lines = [f"{'B':>3} {'d':>5} {'L':>5} {'N':>3} {'dtype':>9} {'ours fwd':>9} {'ours f+b':>9} {'kern fwd':>9} "
             f"{'kern f+b':>9} {'speedup':>8} {'max diff':>9}"]  # fmt: skip
    for r in rows:
        kern = r.get("kernel_fwdbwd_ms")
        cells = (
            (f"{r['kernel_fwd_ms']:9.2f}", f"{kern:9.2f}", f"{r['ours_fwdbwd_ms'] / kern:7.1f}x")
            if kern
            else ("-", "-", "-")
        )
        diff = f"{r['max_abs_diff']:9.1e}" if "max_abs_diff" in r else "-"
        lines.append(
            f"{r['B']:>3} {r['d']:>5} {r['L']:>5} {r['N']:>3} {r['dtype']:>9} {r['ours_fwd_ms']:9.2f} "
            f"{r['ours_fwdbwd_ms']:9.2f} {cells[0]:>9} {cells[1]:>9} {cells[2]:>8} {diff:>9}"
        )
    return lines


def train_table(rows: list[dict]) -> list[str]:
    lines = [f"{'recipe':<16}{'img':>5}{'batch':>6}{'ops':>7}{'img/s':>10}{'step ms':>9}{'peak GiB':>9}"
             f"{'GFLOP/img':>10}{'TFLOP/s':>9}{'MFU':>7}"]  # fmt: skip
    for r in rows:
        lines.append(
            f"{r['recipe']:<16}{r['img_size']:>5}{r['batch']:>6}{r['ops_backend']:>7}{r['img_per_s']:>10.1f}"
            f"{r['step_ms']:>9.1f}{r['peak_mem_gib']:>9.2f}{r['train_gflop_per_img']:>10.1f}"
            f"{r['achieved_tflops']:>9.1f}{100 * r['mfu']:>6.1f}%"
        )
    return lines


def junit_counts(tree: ET.ElementTree) -> dict:
    """{"passed", "failed", "errors", "skipped", "failures": [test ids], "skip_reasons": [...]} of a JUnit XML."""
    cases = tree.getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": []}
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            counts["failed" if "failure" in kinds else "errors"] += 1
            counts["failures"].append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
            counts["skip_reasons"].append(f"{name}: {case.find('skipped').get('message', '')}")
        else:
            counts["passed"] += 1
    return counts


def collected_count(output: str) -> int | None:
    """N from pytest's "N tests collected" / "N/M tests collected (K deselected)" summary, else None."""
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", output)
    return int(m[1]) if m else None


def dry_bench(name: str, argv: list[str]) -> dict:
    """Dry run of a benchmark phase: its arguments parsed by the script's own parser; train: the FLOP counts."""
    import scan  # noqa: PLC0415  (benchmarks/ is on sys.path in gpu_check)
    import train_step  # noqa: PLC0415

    if name == "scan":
        args = scan.parse_args(argv)
        return {"parsed": {k: str(v) for k, v in vars(args).items()}, "sizes": scan.SIZES}
    args = train_step.parse_args(argv)
    rows = []
    for task in args.task:
        cfg = train_step.recipes.get(f"{task}_{args.size}")
        gflop = train_step.flops.train_step_per_image(cfg.model, cfg.task) / 1e9
        rows.append({"recipe": cfg.recipe, "img_size": cfg.model.img_size, "batch": args.batch or cfg.optim.batch_size})
        rows[-1]["train_gflop_per_img"] = round(gflop, 2)
    return {"parsed": {k: str(v) for k, v in vars(args).items()}, "planned": rows}


BLOCKED = ("ray", "mlflow", "boto3", "optuna", "moto")
"""Absent on the GPU machine: the dry run imports everything the phases need with these blocked."""


def import_check_code(blocked: tuple[str, ...] = BLOCKED) -> str:
    """Python code importing IMPORTED_ON_GPU with `blocked` made unimportable (as on the GPU machine)."""
    return (
        "import importlib, sys\n"
        f"for name in {blocked!r}:\n    sys.modules[name] = None\n"
        "sys.path[:0] = ['benchmarks', 'scripts']\n"
        f"for name in {IMPORTED_ON_GPU!r}:\n    importlib.import_module(name)\n"
        f"print('imported without', {blocked!r})\n"
    )
