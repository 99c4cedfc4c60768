"""Offline build of the pinned mamba-ssm / causal-conv1d CUDA extensions for one GPU architecture, fp32 + bf16 only.

The pinned setup.py files compile every kernel for 8 to 11 architectures (a hard-coded -gencode list that no
environment variable narrows; TORCH_CUDA_ARCH_LIST only adds to it) and for every dtype combination (fp16, complex
weights), and try to download a prebuilt wheel first. ARM needs real weights with fp32 or bf16 activations, so this
builds, with torch.utils.cpp_extension (ninja, MAX_JOBS = CPU cores) and upstream's nvcc flags:

- selective_scan_cuda: selective_scan.cpp + fwd / bwd for (input, weight) = (fp32, fp32) and (bf16, fp32);
- causal_conv1d_cuda: causal_conv1d.cpp + fwd / bwd / update (channel-first and -last) for the same two pairs;
- a generated stub file: the other combinations, which the bindings' dtype dispatch still references, raise
  "not built" when called instead of being compiled.

    python scripts/gpu_build.py --sdists .whl --work runs/gpu_build --arch 9.0   # both extensions
Outputs under --work: src/<sdist>/ (the Python packages: put them on PYTHONPATH), gen/ (trimmed sources), ext/<name>.so
(put ext/ on PYTHONPATH) and ext/<name>.json (what was built, how long it took).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tarfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEEP_TYPES = {("float", "float"), ("at::BFloat16", "float")}
"""(input_t, weight_t) pairs compiled: fp32 or bf16 activations with fp32 weights (ARM's A and conv weights)."""
NVCC_FLAGS = [
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
]
"""Upstream setup.py's nvcc flags less -lineinfo, --ptxas-options=-v, --threads and -std (torch sets its own)."""
INSTANTIATION = re.compile(r"^template void (\w+)<(.+?), (.+?)>\((\w+) ?&params, cudaStream_t stream\);[ \t]*$", re.M)
STUB_INCLUDES = ("<c10/util/BFloat16.h>", "<c10/util/Half.h>", "<c10/util/complex.h>", "<c10/util/Exception.h>")


@dataclasses.dataclass(frozen=True)
class Extension:
    """One compiled extension of a pinned sdist: its binding .cpp and kernel .cu files (as in the sdist's setup.py)."""

    name: str
    dist: str
    csrc: str
    binding: str
    kernels: tuple[str, ...]
    headers: tuple[str, ...]


EXTENSIONS = (
    Extension(
        "selective_scan_cuda",
        "mamba-ssm",
        "csrc/selective_scan",
        "selective_scan.cpp",
        tuple(
            f"selective_scan_{k}.cu"
            for k in ("fwd_fp32", "fwd_fp16", "fwd_bf16", "bwd_fp32_real", "bwd_fp32_complex", "bwd_fp16_real")
            + ("bwd_fp16_complex", "bwd_bf16_real", "bwd_bf16_complex")
        ),
        ("selective_scan.h", "selective_scan_common.h"),
    ),
    Extension(
        "causal_conv1d_cuda",
        "causal-conv1d",
        "csrc",
        "causal_conv1d.cpp",
        ("causal_conv1d_fwd.cu", "causal_conv1d_bwd.cu", "causal_conv1d_update.cu"),
        ("causal_conv1d.h",),
    ),
)


def pinned_versions(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """{"mamba-ssm": "2.3.2.post1", "causal-conv1d": "1.7.0"} from pyproject.toml's gpu extra."""
    gpu = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["gpu"]
    return dict(tuple(part.strip() for part in req.split("==")) for req in gpu)


def find_sdists(sdist_dir: Path, pins: dict[str, str]) -> dict[str, Path]:
    """{dist: path of its pinned sdist} in `sdist_dir`; FileNotFoundError naming what is missing."""
    found, missing = {}, []
    for dist, version in pins.items():
        path = sdist_dir / f"{dist.replace('-', '_')}-{version}.tar.gz"
        found[dist] = path
        if not path.is_file():
            missing.append(path.name)
    if missing:
        raise FileNotFoundError(f"missing sdists in {sdist_dir}: {missing} (scripts/install.sh downloads them there)")
    return found


def extract(sdist: Path, dest: Path) -> Path:
    """Unpack `sdist` under `dest` once; returns its top folder (holding setup.py, the package and csrc/)."""
    root = dest / sdist.name.removesuffix(".tar.gz")
    if not (root / "setup.py").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            tar.extractall(dest, filter="data")
    return root


def split_instantiations(text: str) -> tuple[str, list[tuple[str, str, str, str]]]:
    """Keep the explicit instantiations of KEEP_TYPES, drop the others.

    Returns:
        (text with dropped lines commented out, dropped (function, input_t, weight_t, params_type) tuples).
    """
    dropped = []

    def replace(m: re.Match) -> str:
        if (m[2], m[3]) in KEEP_TYPES:
            return m[0]
        dropped.append((m[1], m[2], m[3], m[4]))
        return f"// not built for ARM (scripts/gpu_build.py): {m[0]}"

    return INSTANTIATION.sub(replace, text), dropped


def stub_source(ext: Extension, dropped: list[tuple[str, str, str, str]]) -> str:
    """A .cu defining each dropped instantiation as an explicit specialization that raises when called."""
    lines = ["// Generated by scripts/gpu_build.py: dtype combinations ARM does not use, not compiled."]
    lines += [f"#include {h}" for h in STUB_INCLUDES] + [f'#include "{h}"' for h in ext.headers]
    declared = set()
    for function, itype, wtype, params in dropped:
        if function not in declared:
            declared.add(function)
            lines.append(f"template<typename input_t, typename weight_t> void {function}({params} &, cudaStream_t);")
        message = f"{ext.name}: {function}<{itype}, {wtype}> was not built (scripts/gpu_build.py builds fp32 and bf16)"
        signature = f"template<> void {function}<{itype}, {wtype}>({params} &, cudaStream_t)"
        lines.append(f'{signature} {{ TORCH_CHECK(false, "{message}"); }}')
    return "\n".join(lines) + "\n"


def prepare_sources(ext: Extension, root: Path, gen: Path) -> tuple[list[Path], list[tuple[str, str, str, str]]]:
    """Write trimmed kernel files and the stub under gen/<name>/.

    Returns:
        (sources to compile: the binding, the kernel files keeping an instantiation, the stub; dropped tuples).
    """
    out = gen / ext.name
    out.mkdir(parents=True, exist_ok=True)
    sources, dropped = [root / ext.csrc / ext.binding], []
    for kernel in ext.kernels:
        text, gone = split_instantiations((root / ext.csrc / kernel).read_text())
        dropped += gone
        if "\ntemplate void " in text:
            (out / kernel).write_text(text)
            sources.append(out / kernel)
    stub = out / f"{ext.name}_stubs.cu"
    stub.write_text(stub_source(ext, dropped))
    return [*sources, stub], dropped


def build_kwargs(ext: Extension, sources: list[Path], root: Path, ext_dir: Path, arch: str) -> dict:
    """Arguments of torch.utils.cpp_extension.load for `ext` (one -gencode: torch then adds no arch flags)."""
    code = arch.replace(".", "")
    return {
        "name": ext.name,
        "sources": [str(s) for s in sources],
        "extra_cflags": ["-O3"],
        "extra_cuda_cflags": [*NVCC_FLAGS, f"-gencode=arch=compute_{code},code=sm_{code}"],
        "extra_include_paths": [str(root / ext.csrc)],
        "build_directory": str(ext_dir / ext.name),
        "verbose": True,
    }


def build(ext: Extension, sdist_dir: Path, work: Path, arch: str, dry_run: bool = False) -> dict:
    """Prepare and (unless dry_run) compile `ext` into work/ext/<name>.so; returns the build record."""
    version = pinned_versions()[ext.dist]
    root = extract(find_sdists(sdist_dir, {ext.dist: version})[ext.dist], work / "src")
    sources, dropped = prepare_sources(ext, root, work / "gen")
    kwargs = build_kwargs(ext, sources, root, work / "ext", arch)
    record = {"name": ext.name, "dist": f"{ext.dist}=={version}", "arch": arch, "sources": [s.name for s in sources]}
    record["stubbed"] = [f"{f}<{i}, {w}>" for f, i, w, _ in dropped]
    if dry_run:
        return {**record, "seconds": 0.0, "built": False}
    import torch  # noqa: PLC0415  (heavy: only when building)
    from torch.utils import cpp_extension  # noqa: PLC0415

    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    Path(kwargs["build_directory"]).mkdir(parents=True, exist_ok=True)
    (Path(kwargs["build_directory"]) / "lock").unlink(missing_ok=True)  # left by a killed build: load() would wait
    start = time.perf_counter()
    module = cpp_extension.load(**kwargs)
    if module.__name__ != ext.name:  # torch renames a rebuild in the same process (name_v1): not importable by name
        raise RuntimeError(f"built {module.__name__}, expected {ext.name}: build each extension in a fresh process")
    record.update(seconds=time.perf_counter() - start, built=True, max_jobs=int(os.environ["MAX_JOBS"]))
    record["torch"] = torch.__version__
    (work / "ext" / f"{ext.name}.so").unlink(missing_ok=True)
    (work / "ext" / f"{ext.name}.so").symlink_to(Path(module.__file__).resolve())
    (work / "ext" / f"{ext.name}.json").write_text(json.dumps(record, indent=2))
    return record


def python_path(work: Path) -> list[str]:
    """PYTHONPATH entries that make the built extensions and the pinned Python packages importable."""
    return [str(work / "ext"), *(str(p) for p in sorted((work / "src").glob("*")) if (p / "setup.py").is_file())]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdists", type=Path, default=REPO / ".whl", help="folder holding the pinned sdists")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "gpu_build", help="build folder")
    parser.add_argument("--arch", default="9.0", help="compute capability to build for (H100 / H200: 9.0)")
    parser.add_argument("--ext", choices=[e.name for e in EXTENSIONS], nargs="+", default=[e.name for e in EXTENSIONS])
    parser.add_argument("--dry-run", action="store_true", help="prepare the sources, compile nothing")
    args = parser.parse_args(argv)
    for ext in EXTENSIONS:
        if ext.name in args.ext:
            record = build(ext, args.sdists, args.work, args.arch, args.dry_run)
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
