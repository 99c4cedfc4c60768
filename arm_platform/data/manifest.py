"""The shard manifest (``<data_path>/manifest.json``) and the pre-flight check of a data path (no Ray needed).

Layout of a data path (local folder or s3://bucket/prefix) written by `arm_platform.data.ingest`:
    manifest.json                 classes, per split: count, skipped, shards (path, rows, bytes, sha256); rejected
    <split>/part-00000.parquet    columns: image (JPEG bytes), label (int64), class_name (str), key (str)
    _ingest/<split>/part-*.json   per-shard completion records (resume bookkeeping)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from arm_platform import security, storage
from arm_platform.config import DataConfig

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
PARQUET_MAGIC = b"PAR1"
FOOTER_TAIL = 8
"""A Parquet file ends in <footer length: uint32 little-endian> "PAR1"."""
CHECK_THREADS = 16
"""Shards checked at once by `check_data_path` (each check is one small read)."""
VERIFY_AUTO_MAX_BYTES = 1 << 30
"""With data.verify_checksums=None, the pre-flight check hashes every shard when they total at most this (1 GiB:
a few seconds locally, seconds on S3); bigger sets get the size + footer check only."""


@dataclass(kw_only=True, slots=True)
class ShardInfo:
    path: str
    """Relative to the data path, e.g. "train/part-00000.parquet"."""
    rows: int
    bytes: int | None = None
    """File size; None only in hand-written manifests (then the size check is skipped)."""
    sha256: str = ""
    """Hex digest of the file; "" skips the checksum check."""
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
    rejected: int = 0
    """Source entries refused by the ingest scan (paths escaping the source, unusable split / class names)."""
    rejected_keys: list[str] = field(default_factory=list)
    """The first of them (printable; the count is exact)."""

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
            "rejected": {"count": self.rejected, "keys": self.rejected_keys},
            "shards": {k: [dataclasses.asdict(s) for s in v] for k, v in self.shards.items()},
        }
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, root: str, text: str | bytes) -> Manifest:
        """Parse a manifest read from `root`; ValueError naming the manifest URI and the bad / missing field."""
        uri = storage.join(root, MANIFEST_NAME)
        try:
            body = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{uri} is not valid JSON ({err}); re-run jobs/prepare_data.py to rewrite it") from err
        if not isinstance(body, dict):
            raise ValueError(f"{uri}: expected a JSON object, got {type(body).__name__}")
        if body.get("format") != FORMAT_VERSION:
            raise ValueError(f"{uri}: unsupported manifest format {body.get('format')!r} (expected {FORMAT_VERSION})")
        classes = _field(body, "classes", list, uri)
        if not all(isinstance(c, str) for c in classes):
            raise ValueError(f"{uri}: field 'classes' must be a list of strings")
        splits = _field(body, "shards", dict, uri)
        shards = {}
        for split, entries in splits.items():
            if not isinstance(entries, list):
                raise ValueError(f"{uri}: field 'shards.{split}' must be a list, got {type(entries).__name__}")
            shards[split] = [_parse_shard(e, f"shards.{split}[{i}]", uri) for i, e in enumerate(entries)]
        rejected = body.get("rejected") if isinstance(body.get("rejected"), dict) else {}
        return cls(
            root=root,
            classes=list(classes),
            shards=shards,
            dataset=str(body.get("dataset", "")),
            rejected=int(rejected.get("count", 0)),
            rejected_keys=list(rejected.get("keys", [])),
        )


_SHARD_FIELDS = {f.name for f in dataclasses.fields(ShardInfo)}


def _field(body: dict, name: str, kind: type, where: str) -> Any:
    """body[name] checked against `kind`; ValueError naming `where` and the field."""
    if name not in body:
        raise ValueError(f"{where}: missing field {name!r}")
    if not isinstance(body[name], kind) or (kind is int and isinstance(body[name], bool)):
        raise ValueError(f"{where}: field {name!r} must be {kind.__name__}, got {body[name]!r:.80}")
    return body[name]


def _parse_shard(entry: object, name: str, uri: str) -> ShardInfo:
    """One shards.<split>[i] entry; unknown fields are ignored (newer writers), required ones checked."""
    where = f"{uri} {name}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {entry!r:.80}")
    path = _field(entry, "path", str, where)
    if not security.is_inside(path):
        raise ValueError(f"{where}: path {path!r} is outside the data path")
    _field(entry, "rows", int, where)
    if entry.get("bytes") is not None:
        _field(entry, "bytes", int, where)
    return ShardInfo(**{k: v for k, v in entry.items() if k in _SHARD_FIELDS})


def read_manifest(data_path: str, attempts: int = 1) -> Manifest:
    """Manifest of a data path; FileNotFoundError naming the manifest URI when absent (after `attempts` tries)."""
    if not data_path:
        raise ValueError("data.data_path is empty: run jobs/prepare_data.py and pass its --output")
    uri = storage.join(data_path, MANIFEST_NAME)
    return Manifest.from_json(data_path, storage.retry(lambda: storage.read_bytes(uri), uri, attempts))


def write_manifest(manifest: Manifest) -> str:
    """Atomically write `manifest` to its root; returns the manifest URI."""
    uri = storage.join(manifest.root, MANIFEST_NAME)
    storage.write_bytes_atomic(uri, manifest.to_json().encode())
    return uri


def check_data_path(cfg: DataConfig, splits: tuple[str, ...] | None = None) -> Manifest:
    """Pre-flight check before training starts: manifest readable and complete, splits present and non-empty, and
    every shard of them present, of the size the manifest records, ending in a Parquet footer ("PAR1" magic and a
    footer length that fits) and, when `verify_checksums(cfg, ...)`, of the recorded sha256.

    The size + footer check costs one small read per shard (an S3 range GET), done 16 at a time. Missing objects
    and unreachable stores are retried `cfg.io_retries` times with backoff, then raise FileNotFoundError /
    ConnectionError naming the URI; a damaged shard raises ValueError naming it.
    """
    manifest = read_manifest(cfg.data_path, attempts=cfg.io_retries)
    checks: list[tuple[str, ShardInfo]] = []
    for split in splits or tuple(dict.fromkeys(s for s in (cfg.train_split, cfg.val_split, cfg.probe_split) if s)):
        uris = manifest.shard_uris(split)
        if not uris:
            raise ValueError(f"split {split!r} of {cfg.data_path} has no shards")
        checks += zip(uris, manifest.shards[split], strict=True)
    total = sum(info.bytes or 0 for _, info in checks)
    verify = verify_checksums(cfg, total)
    if storage.is_s3(cfg.data_path):
        storage.s3_client()  # create the cached client once, before threads share it
    with ThreadPoolExecutor(max_workers=min(CHECK_THREADS, len(checks))) as pool:
        list(pool.map(lambda c: check_shard(c[0], c[1], verify=verify, attempts=cfg.io_retries), checks))
    logger.info(
        "data path %s: %s images, %d classes, %d shards checked (%s)",
        cfg.data_path,
        manifest.counts,
        manifest.num_classes,
        len(checks),
        "size, footer, sha256" if verify else "size, footer",
    )
    return manifest


def verify_checksums(cfg: DataConfig, total_bytes: int) -> bool:
    """`cfg.verify_checksums`, or when it is None (auto): hash only data up to VERIFY_AUTO_MAX_BYTES."""
    if cfg.verify_checksums is not None:
        return cfg.verify_checksums
    return total_bytes <= VERIFY_AUTO_MAX_BYTES


def check_shard(uri: str, info: ShardInfo, *, verify: bool, attempts: int = 1) -> None:
    """Size and Parquet footer of one shard against its manifest entry (and its sha256 if `verify`).

    Raises FileNotFoundError (after `attempts` tries) when it is missing, ValueError naming the shard when damaged.
    """
    tail, size = storage.retry(lambda: storage.read_tail(uri, FOOTER_TAIL), uri, attempts)
    if info.bytes is not None and size != info.bytes:
        raise ValueError(
            f"shard {uri} is {size} bytes but {MANIFEST_NAME} records {info.bytes}: truncated or changed after "
            "ingest; re-run jobs/prepare_data.py (it rewrites damaged shards)"
        )
    footer_len = int.from_bytes(tail[:4], "little") if len(tail) == FOOTER_TAIL else -1
    if tail[-4:] != PARQUET_MAGIC or not 0 < footer_len <= size - 2 * len(PARQUET_MAGIC) - 4:
        raise ValueError(f"shard {uri} does not end in a Parquet footer (incomplete upload or truncated file)")
    if verify and info.sha256:
        digest = storage.retry(lambda: storage.sha256(uri), uri, attempts)
        if digest != info.sha256:
            raise ValueError(
                f"shard {uri} has sha256 {digest[:16]}... but {MANIFEST_NAME} records {info.sha256[:16]}...: its "
                "bytes changed after ingest; re-run jobs/prepare_data.py (it rewrites damaged shards)"
            )
