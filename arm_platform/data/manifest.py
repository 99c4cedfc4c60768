"""The shard manifest (``<data_path>/manifest.json``) and the pre-flight check of a data path (no Ray needed).

Layout of a data path (local folder or s3://bucket/prefix) written by `arm_platform.data.ingest`:
    manifest.json                 classes, per split: count, skipped, shards (path, rows, bytes, sha256)
    <split>/part-00000.parquet    columns: image (JPEG bytes), label (int64), class_name (str), key (str)
    _ingest/<split>/part-*.json   per-shard completion records (resume bookkeeping)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field

from arm_platform import storage
from arm_platform.config import DataConfig

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass(kw_only=True, slots=True)
class ShardInfo:
    path: str
    """Relative to the data path, e.g. "train/part-00000.parquet"."""
    rows: int
    bytes: int
    sha256: str
    skipped: int = 0
    """Source images of this shard that could not be read (not in the shard)."""
    skipped_keys: list[str] = field(default_factory=list)
    plan: str = ""
    """Hash of the shard's planned members (keys, sizes, encode settings): a re-run reuses the shard only if equal."""


@dataclass(kw_only=True, slots=True)
class Manifest:
    root: str
    """The data path this manifest was read from / written to."""
    classes: list[str]
    shards: dict[str, list[ShardInfo]]
    dataset: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def counts(self) -> dict[str, int]:
        """Images per split."""
        return {split: sum(s.rows for s in shards) for split, shards in self.shards.items()}

    @property
    def skipped(self) -> dict[str, int]:
        """Unreadable source images per split."""
        return {split: sum(s.skipped for s in shards) for split, shards in self.shards.items()}

    def shard_uris(self, split: str) -> list[str]:
        if split not in self.shards:
            raise ValueError(
                f"split {split!r} not in {storage.join(self.root, MANIFEST_NAME)}; available: {', '.join(self.shards)}"
            )
        return [storage.join(self.root, s.path) for s in self.shards[split]]

    def to_json(self) -> str:
        body = {
            "format": FORMAT_VERSION,
            "dataset": self.dataset,
            "classes": self.classes,
            "counts": self.counts,
            "skipped": self.skipped,
            "shards": {k: [dataclasses.asdict(s) for s in v] for k, v in self.shards.items()},
        }
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, root: str, text: str) -> Manifest:
        body = json.loads(text)
        if body.get("format") != FORMAT_VERSION:
            raise ValueError(f"{storage.join(root, MANIFEST_NAME)}: unsupported manifest format {body.get('format')!r}")
        shards = {k: [ShardInfo(**s) for s in v] for k, v in body["shards"].items()}
        return cls(root=root, classes=list(body["classes"]), shards=shards, dataset=body.get("dataset", ""))


def read_manifest(data_path: str, attempts: int = 1) -> Manifest:
    """Manifest of a data path; FileNotFoundError naming the manifest URI when absent (after `attempts` tries)."""
    if not data_path:
        raise ValueError("data.data_path is empty: run jobs/prepare_data.py and pass its --output")
    uri = storage.join(data_path, MANIFEST_NAME)
    text = storage.retry(lambda: storage.read_bytes(uri), uri, attempts).decode()
    return Manifest.from_json(data_path, text)


def write_manifest(manifest: Manifest) -> str:
    """Atomically write `manifest` to its root; returns the manifest URI."""
    uri = storage.join(manifest.root, MANIFEST_NAME)
    storage.write_bytes_atomic(uri, manifest.to_json().encode())
    return uri


def check_data_path(cfg: DataConfig, splits: tuple[str, ...] | None = None) -> Manifest:
    """Pre-flight check before training starts: manifest readable, splits present and non-empty, every shard exists.

    Missing objects and unreachable stores are retried `cfg.io_retries` times with backoff, then raise
    FileNotFoundError / ConnectionError naming the URI.
    """
    manifest = read_manifest(cfg.data_path, attempts=cfg.io_retries)
    for split in splits or (cfg.train_split, cfg.val_split):
        uris = manifest.shard_uris(split)
        if not uris:
            raise ValueError(f"split {split!r} of {cfg.data_path} has no shards")
        for uri in uris:
            storage.retry(lambda u=uri: _require_exists(u), uri, cfg.io_retries)
    logger.info("data path %s: %s images, %d classes", cfg.data_path, manifest.counts, manifest.num_classes)
    return manifest


def _require_exists(uri: str) -> None:
    if not storage.exists(uri):
        raise FileNotFoundError(f"shard {uri} listed in the manifest does not exist")
