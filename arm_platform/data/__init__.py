"""Data: shard ingest (`ingest`, `fashion_mnist`), the manifest, transforms and the Ray Data pipeline (`datasets`).

`datasets` is the only module that imports Ray; import it explicitly (`from arm_platform.data import datasets`).
"""

from arm_platform.data.manifest import Manifest, ShardInfo, check_data_path, read_manifest

__all__ = ["Manifest", "ShardInfo", "check_data_path", "read_manifest"]
