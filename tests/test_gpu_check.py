"""scripts/gpu_check.py on CPU: arguments, budget, source trimming, FLOP counts, benchmark tables, report, dry run.

Only compiling and running CUDA is left to the GPU machine.
"""

import dataclasses
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from arm_platform.config import ModelConfig
from arm_platform.models import build_model
from arm_platform.recipes import ARM_SIZES

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "benchmarks"), str(REPO / "tests" / "ops")]
import flops  # noqa: E402
import gpu_build  # noqa: E402
import gpu_check  # noqa: E402
import gpu_report  # noqa: E402
import kernel_shim  # noqa: E402
import scan  # noqa: E402
import train_step  # noqa: E402

TINY = ModelConfig(
    name="flops_test", embed_dim=32, depth=2, img_size=32, patch_size=8, cluster_size=2,
    decoder_dim=32, decoder_depth=2, decoder_head_dim=16, num_classes=5,
)  # fmt: skip


@pytest.fixture
def sdists():
    """The pinned sdists in .whl/ (scripts/install.sh downloads them); skip without them."""
    try:
        return gpu_build.find_sdists(REPO / ".whl", gpu_build.pinned_versions())
    except FileNotFoundError as err:
        pytest.skip(str(err))


def test_parse_args_defaults_and_validation():
    args = gpu_check.parse_args([])
    assert args.phases == list(gpu_check.PHASES) and args.budget_s == 570 and not args.dry_run
    assert args.sdists == REPO / ".whl" and args.arch is None
    args = gpu_check.parse_args(["--out", "/o", "--phases", "build", "tests", "--arch", "8.0", "--train-steps", "3"])
    assert (args.out, args.phases, args.arch, args.train_steps) == (Path("/o"), ["build", "tests"], "8.0", 3)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--budget-s", "0"])


def test_clock_leaves_later_phases_their_minimum():
    """A phase may use its default limit only while the later phases keep their minimum time."""
    clock = gpu_check.Clock(300, list(gpu_check.PHASES))
    later = sum(gpu_check.MINIMUMS[p] for p in ("tests", "scan", "train"))
    assert clock.timeout("build") == pytest.approx(300 - later, abs=1)
    assert clock.timeout("train") == gpu_check.TIMEOUTS["train"]
    assert gpu_check.Clock(10_000, ["train"]).timeout("train") == gpu_check.TIMEOUTS["train"]


def test_split_instantiations_keeps_fp32_and_bf16_activations_only():
    text = "\n".join(
        f"template void f_cuda<{i}, {w}>(P &params, cudaStream_t stream);"
        for i in ("float", "at::Half", "at::BFloat16")
        for w in ("float", "at::BFloat16")
    )
    kept, dropped = gpu_build.split_instantiations(text)
    live = [line for line in kept.splitlines() if line.startswith("template")]
    assert live == [
        "template void f_cuda<float, float>(P &params, cudaStream_t stream);",
        "template void f_cuda<at::BFloat16, float>(P &params, cudaStream_t stream);",
    ]
    assert len(dropped) == 4 and ("f_cuda", "at::Half", "float", "P") in dropped
    ext = gpu_build.EXTENSIONS[0]
    stub = gpu_build.stub_source(ext, dropped)
    assert stub.count("template<typename input_t, typename weight_t> void f_cuda(P &, cudaStream_t);") == 1
    assert "template<> void f_cuda<at::Half, float>(P &, cudaStream_t) { TORCH_CHECK(false," in stub


def test_prepared_sources_build_each_pair_once_and_stub_the_rest(sdists, tmp_path):
    """Every instantiation of the pinned kernels is compiled (fp32/bf16 activations, fp32 weights) or stubbed."""
    for ext in gpu_build.EXTENSIONS:
        root = gpu_build.extract(sdists[ext.dist], tmp_path / "src")
        sources, dropped = gpu_build.prepare_sources(ext, root, tmp_path / "gen")
        original = sum((gpu_build.INSTANTIATION.findall((root / ext.csrc / k).read_text()) for k in ext.kernels), [])
        kept = sum((gpu_build.INSTANTIATION.findall(s.read_text()) for s in sources[1:-1]), [])
        assert sorted(kept + dropped) == sorted(original) and kept
        assert {(i, w) for _, i, w, _ in kept} == gpu_build.KEEP_TYPES
        assert sources[0].name == ext.binding and sources[-1].name == f"{ext.name}_stubs.cu"
        kwargs = gpu_build.build_kwargs(ext, sources, root, tmp_path / "ext", "9.0")
        assert "-gencode=arch=compute_90,code=sm_90" in kwargs["extra_cuda_cflags"]
        assert not any("-std" in f or "lineinfo" in f for f in kwargs["extra_cuda_cflags"])
    assert (tmp_path / "src" / "mamba_ssm-2.3.2.post1" / "mamba_ssm" / "ops" / "selective_scan_interface.py").is_file()


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_analytic_flops_equal_torch_flop_counter(monkeypatch, task):
    """Linear + conv + attention FLOPs of a tiny model equal torch's FlopCounterMode (scan stubbed: not a matmul)."""
    inner = sys.modules["arm_platform.ops.mamba_inner"]
    monkeypatch.setattr(inner, "selective_scan_ref", lambda u, delta, A, B, C, D=None, z=None, **kw: u * z)
    model = build_model(TINY, task).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(3, 3, 32, 32))
    analytic = flops.forward(TINY, task)
    assert counter.get_total_flops() / 3 == analytic.total - analytic.scan
    directions, tokens = (1, 3 * 4) if task == "pretrain" else (4, 4 * 4 + 1)  # clusters 0..2 / patches + cls
    assert analytic.scan == TINY.depth * directions * tokens * TINY.d_inner * (9 * TINY.d_state + 2)


def test_arm_base_step_flops_and_mfu():
    """arm_base: 77.0 GFLOP per pretraining image (192 px), 101.7 per finetuning image (224 px); MFU arithmetic."""
    pre = flops.train_step_per_image(ARM_SIZES["base"], "pretrain")
    fine = flops.train_step_per_image(dataclasses.replace(ARM_SIZES["base"], img_size=224), "finetune")
    assert round(pre / 1e9, 2) == 76.95 and round(fine / 1e9, 2) == 101.66
    assert flops.mfu(1000.0, 98.9e9) == pytest.approx(0.1)
    assert flops.H200_BF16_DENSE_PEAK == 989e12


def test_train_step_rows_on_cpu():
    """The CUDA benchmark's row code (recipe batch, MFU fields, table) run on CPU with the tiny recipes."""
    args = train_step.parse_args(
        ["--device", "cuda", "--size", "tiny", "--batch", "2", "--steps", "1", "--warmup", "1"]
    )
    rows = train_step.cuda_table(args, device="cpu")
    assert [r["recipe"] for r in rows] == ["pretrain_tiny", "finetune_tiny"]
    for r in rows:
        assert r["img_per_s"] > 0 and r["ops_backend"] == "ref" and r["peak_tflops"] == 989
        assert r["mfu"] == pytest.approx(r["img_per_s"] * r["train_gflop_per_img"] * 1e9 / 989e12)
    assert "finetune_tiny" in train_step.format_rows(rows)


def test_scan_table_on_cpu_through_the_kernel_shim(monkeypatch):
    """benchmarks/scan.py's CUDA table code, on CPU, with the stock wrapper over the stand-in extension."""
    ns = kernel_shim.install(monkeypatch)
    try:
        monkeypatch.setattr(scan, "SIZES", [(2, 8, 12, 4)])
        rows = scan.cuda_table(scan.parse_args(["--device", "cuda", "--repeats", "1"]), device="cpu")
    finally:
        sys.modules["arm_platform.ops._kernels"].load_kernels.cache_clear()
    assert ns is not None and [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    assert rows[0]["max_abs_diff"] < 1e-5 and rows[1]["max_abs_diff"] < 5e-2
    assert all(r["kernel_fwdbwd_ms"] > 0 for r in rows)
    assert "speedup" in "\n".join(gpu_report.scan_table(rows))


def test_report_written_as_json_and_table(tmp_path):
    row = {"recipe": "pretrain_base", "img_size": 192, "batch": 256, "ops_backend": "kernel", "img_per_s": 4000.0}
    row.update(step_ms=64.0, peak_mem_gib=30.5, train_gflop_per_img=76.95, achieved_tflops=307.8, mfu=0.311)
    scan_row = {"B": 8, "d": 768, "L": 196, "N": 16, "dtype": "bfloat16", "ours_fwd_ms": 5.0, "ours_fwdbwd_ms": 20.0}
    scan_row.update(kernel_fwd_ms=0.1, kernel_fwdbwd_ms=0.4, max_abs_diff=1e-3)
    report = {"started": "now", "pins": {"mamba-ssm": "2.3.2.post1"}, "phases": {
        "env": {"status": "ok", "seconds": 5.0, "facts": {"gpu": "NVIDIA H200", "capability": "9.0",
                                                          "matmul_bf16_tflops": 788.0}},
        "build": {"status": "ok", "seconds": 240.0, "extensions": {"selective_scan_cuda": {
            "name": "selective_scan_cuda", "built": True, "seconds": 238.0, "arch": "9.0", "max_jobs": 16}}},
        "tests": {"status": "failed", "seconds": 30.0, "passed": 9, "failed": 1, "failures": ["t::x"]},
        "scan": {"status": "ok", "seconds": 20.0, "rows": [scan_row]},
        "train": {"status": "skipped", "reason": "20 s of budget left", "rows": [row]},
    }}  # fmt: skip
    gpu_report.write(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    table = (tmp_path / "report.txt").read_text()
    for text in (
        "NVIDIA H200 (sm 9.0)",
        "788.0 TFLOP/s",
        "selective_scan_cuda built in 238 s (sm 9.0, fp32+bf16, MAX_JOBS 16)",
        "9 passed, 1 failed",
        "failed: t::x",
        "50.0x",
        "20 s of budget left",
        "31.1%",
        "989 TFLOP/s",
    ):
        assert text in table, text


def test_junit_and_collection_parsing():
    xml = """<testsuites><testsuite>
      <testcase classname="tests.ops.a" name="ok"/>
      <testcase classname="tests.ops.a" name="bad"><failure message="x"/></testcase>
      <testcase classname="tests.ops.a" name="skip"><skipped message="needs CUDA"/></testcase>
    </testsuite></testsuites>"""
    counts = gpu_report.junit_counts(ET.ElementTree(ET.fromstring(xml)))
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert counts["failures"] == ["tests.ops.a::bad"] and counts["skip_reasons"] == ["tests.ops.a::skip: needs CUDA"]
    assert gpu_report.collected_count("10/62 tests collected (52 deselected) in 3.1s") == 10
    assert gpu_report.collected_count("1 test collected in 0.1s") == 1


def test_dry_run_passes_on_cpu(sdists, tmp_path):
    """The whole check without CUDA: imports without Ray/MLflow, sources trimmed, gpu tests collected, args parsed."""
    out, work = tmp_path / "out", tmp_path / "work"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--work", str(work)]) == 0
    report = json.loads((out / "report.json").read_text())
    phases = report["phases"]
    assert [p["status"] for p in phases.values()] == ["dry-run"] * 5
    assert phases["env"]["imports_without_ray_mlflow"]["rc"] == 0
    assert phases["tests"]["collected"] >= 10
    assert "selective_scan_cuda_stubs.cu" in phases["build"]["extensions"]["selective_scan_cuda"]["sources"]
    assert [r["recipe"] for r in phases["train"]["planned"]] == ["pretrain_base", "finetune_base"]
    assert (out / "report.txt").read_text().startswith("ARM GPU check DRY RUN")


def test_failed_phase_fails_the_check(tmp_path):
    """Missing sdists: the build phase fails, is reported, and the exit code is 1."""
    argv = ["--dry-run", "--phases", "build", "--sdists", str(tmp_path / "none"), "--out", str(tmp_path)]
    assert gpu_check.main([*argv, "--work", str(tmp_path / "w")]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["phases"]["build"]["status"] == "failed"
    assert "missing sdists" in (tmp_path / "build_selective_scan_cuda.log").read_text()


def test_make_gpu_check_target():
    makefile = (REPO / "Makefile").read_text()
    assert "\ngpu-check:" in makefile and "scripts/gpu_check.py" in makefile
