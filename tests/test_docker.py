"""The GPU image recipe (docker/Dockerfile), pyproject.toml, scripts/install.sh and cluster.yaml agree on versions:
Ray, Python, CUDA, torch / torchvision, mamba-ssm / causal-conv1d, the CUDA architectures of the cluster's GPUs and
the image tag. Docker cannot run here: the files are parsed, and install.sh's image path runs in its --dry-run form.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
INSTALL_SH = ROOT / "scripts" / "install.sh"
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<py_minor>\d+)-cu(?P<cuda>\d+)$")
COMPUTE_CAPABILITY = {
    "p4d.24xlarge": "8.0",  # A100
    "p4de.24xlarge": "8.0",
    "p5.48xlarge": "9.0",  # H100
    "p5e.48xlarge": "9.0",  # H200
    "p5en.48xlarge": "9.0",
    "g5.48xlarge": "8.6",  # A10G
    "g6e.48xlarge": "8.9",  # L40S
    "p6-b200.48xlarge": "10.0",  # B200
}


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def args() -> dict[str, str]:
    """The Dockerfile's ARG defaults (quotes stripped)."""
    found = re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M)
    return {name: value.strip("\"'") for name, value in found}


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _requirement(pyproject: dict, name: str) -> Requirement:
    (req,) = [Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == name]
    return req


def _torch_pins() -> dict[str, str]:
    (line,) = re.findall(r"^TORCH_PINS=\((.*)\)$", INSTALL_SH.read_text(), flags=re.M)
    return dict(pin.strip('"').split("==") for pin in line.split())


def _arch_list(value: str) -> list[str]:
    return [arch for arch in re.split(r"[; ]+", value) if arch]


def test_base_image_ray_python_and_cuda_agree(args, pyproject):
    """FROM the Ray image: its Ray satisfies pyproject's ray requirement, its Python the package's, and its CUDA
    toolkit (which compiles the kernels) is the CUDA of the torch wheels."""
    assert "FROM ${RAY_IMAGE}" in DOCKERFILE.read_text()
    image = RAY_IMAGE.match(args["RAY_IMAGE"])
    assert image, args["RAY_IMAGE"]
    assert Version(image["ray"]) in _requirement(pyproject, "ray").specifier
    python = Version(f"{image['py']}.{image['py_minor']}")
    assert python in Requirement(f"python{pyproject['project']['requires-python']}").specifier
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith(f"/cu{image['cuda']}"), (args, image["cuda"])


def test_torch_pins_are_one_pair_that_satisfies_pyproject(pyproject):
    pins = _torch_pins()
    assert set(pins) == {"torch", "torchvision"}
    torch, vision = Version(pins["torch"]), Version(pins["torchvision"])
    assert torch in _requirement(pyproject, "torch").specifier
    assert (vision.major, vision.minor) == (0, torch.minor + 15), "torchvision 0.(N+15) goes with torch 2.N"


def test_kernel_pins_are_exact_and_shared(pyproject):
    """pyproject's gpu extra pins exact versions, and scripts/gpu_build.py (which compiles them) reads the same."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_build
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    pins = {req.name: str(req.specifier) for req in map(Requirement, _gpu(pyproject))}
    assert set(pins) == {"mamba-ssm", "causal-conv1d"} and all(s.startswith("==") for s in pins.values())
    assert gpu_build.pinned_versions() == {name: spec.removeprefix("==") for name, spec in pins.items()}


def _gpu(pyproject: dict) -> list[str]:
    return pyproject["project"]["optional-dependencies"]["gpu"]


def test_dockerfile_installs_only_through_install_sh():
    """One source of truth: no pip / version pins of its own; the kernel layer copies all install.sh reads."""
    text = DOCKERFILE.read_text()
    runs = re.findall(r"^RUN (.*)$", text, flags=re.M)
    assert not [run for run in runs if "pip" in run]
    assert "bash scripts/install.sh --image --no-package" in runs
    assert any(run.startswith("bash scripts/install.sh --image &&") for run in runs)
    assert not re.search(r"(torch|mamba|causal)[\w-]*==", text)
    first_layer = text[: text.index("RUN bash scripts/install.sh --image --no-package")]
    copied = " ".join(re.findall(r"^COPY (?:--\S+ )*(.*)$", first_layer, flags=re.M))
    for needed in ("pyproject.toml", "scripts/install.sh", "scripts/gpu_build.py"):
        assert needed in copied, f"{needed} is not in the kernel layer"


def test_install_sh_image_path_uses_the_pins_and_arch_list(args, pyproject, tmp_path):
    """`install.sh --image --dry-run` with the Dockerfile's build args: torch pins from the CUDA index, the gpu
    extra's kernel sources, one gpu_build.py run emitting code for every arch, then the package."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "ARM_STATE_DIR": str(tmp_path),
        "TORCH_INDEX_URL": args["TORCH_INDEX_URL"],
        "TORCH_CUDA_ARCH_LIST": args["TORCH_CUDA_ARCH_LIST"],
    }
    env.pop("NVCC_APPEND_FLAGS", None)
    out = subprocess.run(
        ["bash", str(INSTALL_SH), "--image", "--dry-run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    torch_line = next(line for line in lines if "torch==" in line)
    assert f"--index-url {args['TORCH_INDEX_URL']}" in torch_line
    assert all(f"{name}=={version}" in torch_line for name, version in _torch_pins().items())
    assert any(all(pin in line for pin in _gpu(pyproject)) and " install " in line for line in lines)
    (build,) = [line for line in lines if "scripts/gpu_build.py" in line]
    first, *rest = _arch_list(args["TORCH_CUDA_ARCH_LIST"])
    assert build.endswith(f"--arch {first}")
    emitted = {first} | {f"{c[:-1]}.{c[-1]}" for c in re.findall(r"-gencode=arch=compute_(\d+),code=sm_\1", build)}
    assert emitted == {first, *rest}
    assert lines[-1].endswith("-m pip install -q --no-cache-dir .[tune]")  # the cluster sweeps use --optuna
    refused = subprocess.run(
        ["bash", str(INSTALL_SH), "--image", "--dry-run"], env={**env, "TORCH_CUDA_ARCH_LIST": ""}, capture_output=True
    )
    assert refused.returncode != 0  # the image path has no default arch list: the Dockerfile is its one source


def test_image_arch_list_covers_every_gpu_node_type(args, cluster):
    """Each GPU node type's compute capability has code in the image (sm_X.Y runs on X.Z >= Y of the same X)."""
    built = [Version(a) for a in _arch_list(args["TORCH_CUDA_ARCH_LIST"])]
    for name, node_type in cluster["available_node_types"].items():
        if node_type["resources"].get("GPU", 0) > 0:
            instance = node_type["node_config"]["InstanceType"]
            assert instance in COMPUTE_CAPABILITY, f"{name}: add {instance}'s compute capability to this test"
            cc = Version(COMPUTE_CAPABILITY[instance])
            assert any(b.major == cc.major and b.minor <= cc.minor for b in built), (name, instance, built)


def test_cluster_runs_this_version_of_the_image(cluster, pyproject):
    """cluster.yaml's image is arm-platform:<pyproject version>, pulled from the registry it logs in to, and the
    docker/README build commands tag the same name."""
    image = cluster["docker"]["image"]
    registry, _, name_tag = image.rpartition("/")
    assert name_tag == f"arm-platform:{pyproject['project']['version']}"
    assert any(registry in command and "docker login" in command for command in cluster["initialization_commands"])
    readme = (ROOT / "docker" / "README.md").read_text()
    assert 'docker build -f docker/Dockerfile -t "$REGISTRY/arm-platform:$VERSION" .' in readme
    assert '["project"]["version"]' in readme


def test_docs_name_the_base_image_of_the_dockerfile(args):
    for doc in (ROOT / "docker" / "README.md", ROOT / "cluster.yaml"):
        assert args["RAY_IMAGE"] in doc.read_text(), doc


def test_build_context_leaves_out_local_state():
    ignored = (ROOT / "docker" / "Dockerfile.dockerignore").read_text().split()
    for path in ("**/.git", "**/.venv", "runs", "data", ".arm.env"):
        assert path in ignored
