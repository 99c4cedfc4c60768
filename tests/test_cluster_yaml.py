"""cluster.yaml validates against Ray's own autoscaler schema and has the node types the jobs expect."""

import re
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_schema(cluster):
    """Ray's validate_config accepts the file as written and after Ray fills in its AWS defaults."""
    validate_config(prepare_config(cluster))
    jsonschema.validate(cluster, _ray_schema())


def test_schema_rejects_a_misspelled_field(cluster):
    """The schema check is strict: an unknown node-type field fails (so the test above can fail)."""
    broken = yaml.safe_load(CLUSTER_YAML.read_text())
    broken["available_node_types"]["gpu_p4d"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_gpu_worker_types_have_8_gpus_and_compile_nothing_at_boot(cluster):
    """The kernels come prebuilt in the image (docker/Dockerfile): no node type pip-installs or compiles them."""
    types = cluster["available_node_types"]
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert {t["node_config"]["InstanceType"] for t in gpu_types.values()} == {"p4d.24xlarge", "p5.48xlarge"}
    for node_type in gpu_types.values():
        assert node_type["resources"]["GPU"] == 8
        assert node_type["min_workers"] == 0 < node_type["max_workers"]
    commands = [*cluster["setup_commands"], *cluster["head_setup_commands"], *cluster["worker_setup_commands"]]
    commands += [c for t in types.values() for c in t.get("worker_setup_commands", [])]
    for command in commands:
        assert "pip install" not in command and "[gpu]" not in command and "MAMBA_" not in command, command


def test_head_and_data_worker_are_cpu_only(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    data = types["data_cpu"]
    assert data["resources"].get("GPU", 0) == 0 and data["resources"]["data_worker"] > 0
    assert (
        sum(t.get("max_workers", 0) for n, t in types.items() if n != cluster["head_node_type"])
        <= cluster["max_workers"]
    )


def test_image_is_ours_and_no_secrets_inline(cluster):
    """Every node runs the arm-platform image (docker/Dockerfile; tests/test_docker.py checks its versions); the env
    file is exported to `ray start`; no credentials anywhere in the file."""
    assert "/arm-platform:" in cluster["docker"]["image"]
    assert not any(key in cluster["docker"] for key in ("head_image", "worker_image"))
    assert not any("docker" in t for t in cluster["available_node_types"].values())
    text = CLUSTER_YAML.read_text()
    for secret in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "aws_secret"):
        assert secret not in text
    assert not re.search(r"(?i)(password|secret|token)\s*[:=]\s*\S", text)  # the ECR login reads its password
    assert any("arm.env" in c and ".bashrc" in c for c in cluster["setup_commands"])
    assert cluster["file_mounts"] == {"~/arm.env": "./.arm.env"}


def _ray_schema() -> dict:
    import json

    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
