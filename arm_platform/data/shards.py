"""Write source items into Parquet shards + manifest (the part of ingest shared by every source).

Sources build `Item`s (`ingest.py`: ImageFolder trees and tars; `fashion_mnist.py`: arrays) and call `ingest`. Items
are shuffled once with a fixed seed (so shards mix classes), packed into shards of about `shard_size_mb` by source
size, and written in parallel processes. Each shard is verified (every image fully decoded and converted to an RGB
JPEG by `images.to_rgb_jpeg`; unreadable ones are skipped, counted and listed), written atomically, and followed by
a small completion record under ``_ingest/``; a re-run skips shards whose record, plan hash and on-storage sha256
all match, so an interrupted job resumes where it stopped (and a shard whose bytes changed is rewritten). The
manifest is written last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from arm_platform import storage
from arm_platform.config import DataConfig
from arm_platform.data.images import to_rgb_jpeg
from arm_platform.data.manifest import Manifest, ShardInfo, write_manifest

logger = logging.getLogger(__name__)

SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("class_name", pa.string()), ("key", pa.string())])
DICTIONARY_COLUMNS = ["label", "class_name"]
"""Columns with few distinct values; the rest are written plain."""
MAX_SKIPPED_KEYS = 100
"""Keys of unreadable images kept per shard (and rejected entries per manifest); the counts are always exact."""


# --------------------------------------------------------------------------------------------------------------------
# items: one source image each; picklable so shards can be built in worker processes


@dataclass(frozen=True, slots=True)
class FileItem:
    key: str
    label: int
    path: str
    size: int

    def load(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()


@dataclass(frozen=True, slots=True)
class TarItem:
    key: str
    label: int
    tar_path: str
    offset: int
    size: int

    def load(self) -> bytes:
        with open(self.tar_path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass(frozen=True, slots=True)
class ArrayItem:
    key: str
    label: int
    pixels: bytes
    """Raw uint8 pixels, (H, W) grayscale or (H, W, 3) RGB."""
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.pixels)

    def load(self) -> np.ndarray:
        return np.frombuffer(self.pixels, dtype=np.uint8).reshape(self.shape)


@dataclass(frozen=True, slots=True)
class UnreadableItem:
    """A source entry found by the scan but unusable (name not UTF-8, symlink loop, unreadable stat): it is planned
    like any item, so it is skipped, counted and listed in its shard's `skipped_keys` like a corrupt image."""

    key: str
    label: int
    reason: str
    size: int = 0

    def load(self) -> bytes:
        raise OSError(self.reason)


Item = FileItem | TarItem | ArrayItem | UnreadableItem


# --------------------------------------------------------------------------------------------------------------------
# planning and writing shards


@dataclass(frozen=True, slots=True)
class ShardTask:
    output: str
    split: str
    index: int
    items: tuple[Item, ...]
    classes: tuple[str, ...]
    jpeg_quality: int

    @property
    def path(self) -> str:
        return f"{self.split}/part-{self.index:05d}.parquet"

    @property
    def record_uri(self) -> str:
        return storage.join(self.output, "_ingest", self.split, f"part-{self.index:05d}.json")

    @property
    def plan(self) -> str:
        """Hash of what this shard will contain, so a resumed run never reuses a shard planned differently."""
        h = hashlib.sha256(f"{self.jpeg_quality}|{len(self.classes)}".encode())
        for item in self.items:
            h.update(f"|{item.key}:{item.label}:{item.size}".encode())
        return h.hexdigest()


def plan_shards(items: list[Item], shard_size_mb: float, seed: int) -> list[list[Item]]:
    """Shuffle `items` with `seed` (stable across runs) and pack them into shards of about `shard_size_mb`."""
    if shard_size_mb <= 0:
        raise ValueError(f"shard_size_mb must be positive, got {shard_size_mb}")
    order = sorted(items, key=lambda it: it.key)
    random.Random(seed).shuffle(order)
    limit = shard_size_mb * 2**20
    shards: list[list[Item]] = [[]]
    total = 0
    for item in order:
        if shards[-1] and total + item.size > limit:
            shards.append([])
            total = 0
        shards[-1].append(item)
        total += item.size
    return shards if shards[0] else []


def _existing_record(task: ShardTask) -> ShardInfo | None:
    """The completion record of a previous run if its shard is still intact (same plan, same sha256)."""
    try:
        info = ShardInfo(**json.loads(storage.read_bytes(task.record_uri)))
        if info.plan != task.plan:
            return None
        digest = storage.sha256(storage.join(task.output, task.path))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    return info if digest == info.sha256 else None


def _encode(task: ShardTask) -> tuple[dict[str, list], list[str]]:
    """(columns of the shard's readable images, keys of the unreadable ones)."""
    columns: dict[str, list] = {"image": [], "label": [], "class_name": [], "key": []}
    skipped: list[str] = []
    for item in task.items:
        try:
            data = to_rgb_jpeg(item.load(), task.jpeg_quality)
        except OSError:
            data = None
        if data is None:
            skipped.append(item.key)
            continue
        columns["image"].append(data)
        columns["label"].append(item.label)
        columns["class_name"].append(task.classes[item.label])
        columns["key"].append(item.key)
    return columns, skipped


def build_shard(task: ShardTask) -> tuple[ShardInfo, bool]:
    """Write one shard (unless a previous run already did); returns (its info, whether it was written now)."""
    done = _existing_record(task)
    if done is not None:
        return done, False
    columns, skipped = _encode(task)
    buf = io.BytesIO()
    # JPEG bytes are already compressed and unique: no codec, no dictionary (dictionary-encoded blobs read ~7x slower).
    pq.write_table(pa.table(columns, schema=SCHEMA), buf, compression="none", use_dictionary=DICTIONARY_COLUMNS)
    data = buf.getvalue()
    storage.write_bytes_atomic(storage.join(task.output, task.path), data)
    info = ShardInfo(
        path=task.path,
        rows=len(columns["key"]),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        skipped=len(skipped),
        skipped_keys=skipped[:MAX_SKIPPED_KEYS],
        plan=task.plan,
    )
    storage.write_bytes_atomic(task.record_uri, json.dumps(dataclasses.asdict(info)).encode())
    if skipped:
        logger.warning("%s: skipped %d unreadable images (e.g. %s)", task.path, len(skipped), skipped[0])
    return info, True


def ingest(
    items: dict[str, list[Item]],
    classes: list[str],
    output: str,
    cfg: DataConfig,
    *,
    dataset: str = "",
    seed: int = 0,
    rejected: Sequence[str] = (),
) -> Manifest:
    """Write every split of `items` as shards under `output`, then the manifest; returns the manifest.

    Uses `cfg.shard_size_mb`, `cfg.num_parallel` (processes; 1 runs inline) and `cfg.jpeg_quality`. `rejected`:
    source entries the scan refused (paths escaping the source, unusable split / class names); they are counted and
    listed in the manifest, never written.
    """
    tasks = [
        ShardTask(
            output=output,
            split=split,
            index=i,
            items=tuple(shard),
            classes=tuple(classes),
            jpeg_quality=cfg.jpeg_quality,
        )
        for split in sorted(items)
        for i, shard in enumerate(plan_shards(items[split], cfg.shard_size_mb, seed))
    ]
    workers = min(cfg.num_parallel or os.cpu_count() or 1, max(len(tasks), 1))
    logger.info(
        "ingest: %d images -> %d shards at %s with %d processes",
        sum(len(v) for v in items.values()),
        len(tasks),
        output,
        workers,
    )
    if workers == 1:
        results = [build_shard(t) for t in tasks]
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=storage.reset_clients) as pool:
            results = list(pool.map(build_shard, tasks))
    shards: dict[str, list[ShardInfo]] = {split: [] for split in sorted(items)}
    for task, (info, _) in zip(tasks, results, strict=True):
        shards[task.split].append(info)
    written = sum(w for _, w in results)
    manifest = Manifest(
        root=output,
        classes=list(classes),
        shards=shards,
        dataset=dataset,
        rejected=len(rejected),
        rejected_keys=list(rejected[:MAX_SKIPPED_KEYS]),
    )
    uri = write_manifest(manifest)
    logger.info(
        "ingest: wrote %d shards, reused %d; %s images, %s skipped, %d rejected; manifest %s",
        written,
        len(results) - written,
        manifest.counts,
        manifest.skipped,
        len(rejected),
        uri,
    )
    return manifest


__all__ = [
    "SCHEMA",
    "ArrayItem",
    "FileItem",
    "Item",
    "ShardTask",
    "TarItem",
    "UnreadableItem",
    "build_shard",
    "ingest",
    "plan_shards",
]
