"""Convert images into Parquet shards + manifest on a local folder or s3://bucket/prefix.

Sources: an ImageFolder tree (``<src>/<split>/<class>/<image>``), an uncompressed .tar of one, or in-memory arrays
(Fashion-MNIST). Items are shuffled once with a fixed seed (so shards mix classes), packed into shards of about
`shard_size_mb` by source size, and written in parallel processes. Each shard is verified (every image fully decoded;
unreadable ones are skipped and counted), written atomically, and followed by a small completion record under
``_ingest/``; a re-run skips shards whose record, plan hash and on-storage sha256 all match, so an interrupted job
resumes where it stopped. The manifest is written last.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import tarfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from arm_platform import storage
from arm_platform.config import DataConfig
from arm_platform.data.manifest import Manifest, ShardInfo, write_manifest

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""torchvision ImageFolder's extensions; other files are ignored (not counted as unreadable)."""
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("class_name", pa.string()), ("key", pa.string())])
DICTIONARY_COLUMNS = ["label", "class_name"]
"""Columns with few distinct values; the rest are written plain."""
MAX_SKIPPED_KEYS = 100
"""Keys of unreadable images kept per shard in the manifest (the count is always exact)."""


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


Item = FileItem | TarItem | ArrayItem


def to_rgb_jpeg(payload: bytes | np.ndarray, quality: int) -> bytes | None:
    """RGB JPEG bytes of an encoded image or a pixel array; None if unreadable.

    RGB JPEGs are kept byte for byte (after a full decode to prove they are readable); anything else (PNG, CMYK or
    grayscale JPEG, arrays) is converted to RGB and encoded at `quality`.
    """
    try:
        if isinstance(payload, np.ndarray):
            img = Image.fromarray(payload)
        else:
            img = Image.open(io.BytesIO(payload))
            img.load()
            if img.format == "JPEG" and img.mode == "RGB":
                return payload
        out = io.BytesIO()
        img.convert("RGB").save(out, format="JPEG", quality=quality)
        return out.getvalue()
    except Exception:  # noqa: BLE001 -- PIL raises many types for bad data; an unreadable image is counted, not fatal
        return None


# --------------------------------------------------------------------------------------------------------------------
# scanning sources


def _split_classes(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """Sorted class names of the "train" split (all splits when there is none)."""
    pairs = list(pairs)
    train = {c for s, c in pairs if s == "train"}
    return sorted(train or {c for _, c in pairs})


def _check_classes(classes: list[str], pairs: Iterable[tuple[str, str]], src: str) -> None:
    unknown = sorted({f"{s}/{c}" for s, c in pairs if c not in set(classes)})
    if unknown:
        raise ValueError(f"{src}: class folders missing from the train split: {', '.join(unknown[:5])}")


def scan_image_folder(src: str) -> tuple[list[str], dict[str, list[Item]]]:
    """(classes, {split: items}) of an ImageFolder tree <src>/<split>/<class>/<image>."""
    if not os.path.isdir(src):
        raise ValueError(f"--src {src!r} is not a folder or .tar")
    found: list[tuple[str, str, str]] = []  # (split, class, path)
    for split in sorted(e.name for e in os.scandir(src) if e.is_dir()):
        for cls in sorted(e.name for e in os.scandir(os.path.join(src, split)) if e.is_dir()):
            folder = os.path.join(src, split, cls)
            for root, _, names in os.walk(folder):
                found += [(split, cls, os.path.join(root, n)) for n in names if n.lower().endswith(IMG_EXTENSIONS)]
    if not found:
        raise ValueError(f"{src}: no images found; expected <split>/<class>/<image> (e.g. train/n01440764/x.JPEG)")
    classes = _split_classes((s, c) for s, c, _ in found)
    _check_classes(classes, ((s, c) for s, c, _ in found), src)
    index = {c: i for i, c in enumerate(classes)}
    items: dict[str, list[Item]] = {}
    for split, cls, path in found:
        key = os.path.relpath(path, src).replace(os.sep, "/")
        items.setdefault(split, []).append(FileItem(key=key, label=index[cls], path=path, size=os.path.getsize(path)))
    return classes, items


def scan_tar(src: str) -> tuple[list[str], dict[str, list[Item]]]:
    """(classes, {split: items}) of an uncompressed tar of an ImageFolder tree ([prefix/]<split>/<class>/<image>)."""
    try:
        tar = tarfile.open(src, mode="r:")
    except tarfile.ReadError as err:
        raise ValueError(f"{src}: not an uncompressed tar ({err}); extract compressed archives first") from err
    found: list[tuple[str, str, tarfile.TarInfo]] = []
    with tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) >= 3 and parts[-1].lower().endswith(IMG_EXTENSIONS):
                found.append((parts[-3], parts[-2], member))
    if not found:
        raise ValueError(f"{src}: no images found; expected [prefix/]<split>/<class>/<image> members")
    classes = _split_classes((s, c) for s, c, _ in found)
    _check_classes(classes, ((s, c) for s, c, _ in found), src)
    index = {c: i for i, c in enumerate(classes)}
    items: dict[str, list[Item]] = {}
    for split, cls, m in found:
        key = "/".join(m.name.split("/")[-3:])
        items.setdefault(split, []).append(
            TarItem(key=key, label=index[cls], tar_path=os.path.abspath(src), offset=m.offset_data, size=m.size)
        )
    return classes, items


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
        data = storage.read_bytes(storage.join(task.output, task.path))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    return info if hashlib.sha256(data).hexdigest() == info.sha256 else None


def build_shard(task: ShardTask) -> tuple[ShardInfo, bool]:
    """Write one shard (unless a previous run already did); returns (its info, whether it was written now)."""
    done = _existing_record(task)
    if done is not None:
        return done, False
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
    items: dict[str, list[Item]], classes: list[str], output: str, cfg: DataConfig, *, dataset: str = "", seed: int = 0
) -> Manifest:
    """Write every split of `items` as shards under `output`, then the manifest; returns the manifest.

    Uses `cfg.shard_size_mb`, `cfg.num_parallel` (processes; 1 runs inline) and `cfg.jpeg_quality`.
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
    manifest = Manifest(root=output, classes=list(classes), shards=shards, dataset=dataset)
    uri = write_manifest(manifest)
    logger.info(
        "ingest: wrote %d shards, reused %d; %s images, %s skipped; manifest %s",
        written,
        len(results) - written,
        manifest.counts,
        manifest.skipped,
        uri,
    )
    return manifest


def ingest_folder(src: str, output: str, cfg: DataConfig) -> Manifest:
    """ImageFolder tree or uncompressed .tar of one -> shards + manifest at `output` (folder or s3:// URI)."""
    scan = scan_tar if src.endswith(".tar") else scan_image_folder
    classes, items = scan(src)
    return ingest(items, classes, output, cfg, dataset=os.path.basename(os.path.normpath(src)))


def main(argv: list[str] | None = None) -> Manifest:
    """CLI of `jobs/prepare_data.py`: --src TREE_OR_TAR --output DIR_OR_S3, or --dataset fashion-mnist."""
    parser = argparse.ArgumentParser(description="Convert images into Parquet shards + manifest.json")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--src", help="ImageFolder tree <src>/<split>/<class>/<image>, or an uncompressed .tar of one")
    source.add_argument("--dataset", choices=["fashion-mnist"], help="embedded dataset (apt dataset-fashion-mnist)")
    parser.add_argument("--output", help="folder or s3://bucket/prefix (fashion-mnist default: %(default)s)")
    parser.add_argument("--shard-size-mb", type=float, help="target shard size (default: DataConfig.shard_size_mb)")
    parser.add_argument("--num-parallel", type=int, help="processes (default: every CPU)")
    parser.add_argument("--limit-per-split", type=int, help="fashion-mnist: first N images of each split")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"shard_size_mb": args.shard_size_mb, "num_parallel": args.num_parallel}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.dataset == "fashion-mnist":
        from arm_platform import recipes
        from arm_platform.data import fashion_mnist

        cfg = DataConfig(**{"shard_size_mb": recipes.FASHION_MNIST_SHARD_MB, **overrides})
        return fashion_mnist.prepare(args.output or recipes.FASHION_MNIST_SHARDS, cfg, args.limit_per_split)
    if not args.output:
        parser.error("--output is required with --src")
    return ingest_folder(args.src, args.output, DataConfig(**overrides))


__all__ = [
    "ArrayItem",
    "FileItem",
    "TarItem",
    "build_shard",
    "ingest",
    "ingest_folder",
    "main",
    "plan_shards",
    "scan_image_folder",
    "scan_tar",
    "to_rgb_jpeg",
]
