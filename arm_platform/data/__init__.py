"""Data: shard ingest (`ingest` scans trees / tars, `fashion_mnist` arrays; both feed `shards`, which encodes with
`images`), the manifest and its pre-flight check (`manifest`), transforms and the Ray Data pipeline (`datasets`).

`datasets` is the only module that imports Ray; import it explicitly (`from arm_platform.data import datasets`).
"""

from arm_platform.data.manifest import Manifest, ShardInfo, check_data_path, read_manifest

__all__ = ["Manifest", "ShardInfo", "check_data_path", "read_manifest"]
