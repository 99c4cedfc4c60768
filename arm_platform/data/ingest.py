"""Convert an ImageFolder tree or a tar of one into Parquet shards + manifest on a local folder or s3://bucket/prefix.

Sources: an ImageFolder tree (``<src>/<split>/<class>/<image>``) or an uncompressed .tar of one
(``[prefix/]<split>/<class>/<image>``); Fashion-MNIST arrays come from `fashion_mnist`. This module scans a source
into items; `shards.ingest` writes them (shuffled, packed, verified, resumable, atomic; see there).

What the scan does with bad input (nothing it refuses is ever written):
- Tar members whose path is absolute or has a ".." segment (even one that resolves inside) are rejected: counted
  and listed in the manifest's ``rejected``, with a warning. "." segments are dropped ("./train/..." is fine).
- Split and class names must be UTF-8 text: a folder / member whose split or class name is not is rejected (tar)
  or rejected as a whole folder (ImageFolder). Hidden split / class folders (".ipynb_checkpoints") are ignored with
  a warning, like non-image files.
- Image files that cannot be used by name or stat (file name not valid UTF-8, symlink loop, dangling symlink, no
  permission) are skipped, counted and listed in their shard's ``skipped_keys`` (with a printable key, undecodable
  bytes as ``\\xNN``), exactly like files that do not decode.
- Empty class folders are kept in ``classes`` (with a warning): label ids are the sorted class folders of the train
  split, so they do not shift when a class happens to have no images in this copy, and every split of the same tree
  uses the same ids. Tars have no folders of their own, so their classes are the ones holding images.
"""

from __future__ import annotations

import argparse
import logging
import os
import tarfile
from dataclasses import dataclass, field

from arm_platform import recipes, security
from arm_platform.config import DataConfig
from arm_platform.data import fashion_mnist
from arm_platform.data.images import to_rgb_jpeg
from arm_platform.data.manifest import Manifest
from arm_platform.data.shards import (
    SCHEMA,
    ArrayItem,
    FileItem,
    Item,
    TarItem,
    UnreadableItem,
    build_shard,
    ingest,
    plan_shards,
)

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""torchvision ImageFolder's extensions; other files are ignored (not counted as unreadable)."""
NOT_UTF8 = "file name is not valid UTF-8"


@dataclass(slots=True)
class Scan:
    """What a source holds: class names (label = index), items per split, and the entries refused."""

    classes: list[str]
    items: dict[str, list[Item]]
    rejected: list[str] = field(default_factory=list)


def printable(name: str) -> tuple[str, bool]:
    """(`name` with undecodable bytes as \\xNN, whether it was valid UTF-8); OS names carry them as surrogates."""
    try:
        name.encode("utf-8")
        return name, True
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), False


def _classes(class_dirs: dict[str, list[str]], used: set[tuple[str, str]], src: str) -> list[str]:
    """Sorted class folders of the "train" split (all splits when there is none); ValueError if another split
    holds images of a class the train split lacks; a warning for every empty class folder."""
    train = class_dirs.get("train")
    classes = sorted(set(train) if train is not None else {c for cs in class_dirs.values() for c in cs})
    unknown = sorted({f"{s}/{c}" for s, c in used if c not in set(classes)})
    if unknown:
        raise ValueError(f"{src}: class folders missing from the train split: {', '.join(unknown[:5])}")
    empty = [f"{s}/{c}" for s, cs in sorted(class_dirs.items()) for c in cs if (s, c) not in used]
    if empty:
        logger.warning(
            "%s: %d class folders hold no images: %s; kept in classes so label ids stay stable",
            src,
            len(empty),
            ", ".join(empty[:10]),
        )
    return classes


def _subdirs(folder: str, rejected: list[str], src: str) -> list[str]:
    """Sorted usable subfolder names of `folder`; non-UTF-8 ones go to `rejected`, hidden ones are ignored."""
    names = []
    for entry in os.scandir(folder):
        try:
            is_dir = entry.is_dir()
        except OSError:  # a symlink loop: not a folder
            is_dir = False
        text, ok = printable(os.path.relpath(entry.path, src))
        if not is_dir:
            continue
        if not ok:
            logger.warning("%s: folder %s is not valid UTF-8: rejected", src, text)
            rejected.append(text)
        elif entry.name.startswith("."):
            logger.warning("%s: hidden folder %s ignored", src, text)
        else:
            names.append(entry.name)
    return sorted(names)


def _file_item(src: str, path: str, label: int) -> Item:
    """A FileItem, or an UnreadableItem when the name is not UTF-8 or the file cannot be stat'ed."""
    key, ok = printable(os.path.relpath(path, src).replace(os.sep, "/"))
    if not ok:
        return UnreadableItem(key=key, label=label, reason=NOT_UTF8)
    try:
        size = os.stat(path).st_size
    except OSError as err:  # symlink loop, dangling symlink, no permission
        return UnreadableItem(key=key, label=label, reason=err.strerror or str(err))
    return FileItem(key=key, label=label, path=path, size=size)


def scan_image_folder(src: str) -> Scan:
    """Classes, items and rejected entries of an ImageFolder tree <src>/<split>/<class>/<image> (module docstring)."""
    if not os.path.isdir(src):
        raise ValueError(f"--src {src!r} is not a folder or .tar")
    rejected: list[str] = []
    class_dirs: dict[str, list[str]] = {}
    found: list[tuple[str, str, str]] = []  # (split, class, path)
    for split in _subdirs(src, rejected, src):
        class_dirs[split] = _subdirs(os.path.join(src, split), rejected, src)
        for cls in class_dirs[split]:
            for root, _, names in os.walk(os.path.join(src, split, cls)):
                found += [(split, cls, os.path.join(root, n)) for n in names if n.lower().endswith(IMG_EXTENSIONS)]
    if not found:
        raise ValueError(f"{src}: no images found; expected <split>/<class>/<image> (e.g. train/n01440764/x.JPEG)")
    classes = _classes(class_dirs, {(s, c) for s, c, _ in found}, src)
    index = {c: i for i, c in enumerate(classes)}
    items: dict[str, list[Item]] = {}
    for split, cls, path in found:
        items.setdefault(split, []).append(_file_item(src, path, index[cls]))
    return Scan(classes, items, rejected)


def _tar_members(src: str) -> tuple[list[tuple[str, str, tarfile.TarInfo]], list[str]]:
    """([(split, class, member)] of the image files in the tar, rejected member names)."""
    try:
        tar = tarfile.open(src, mode="r:")
    except tarfile.ReadError as err:
        raise ValueError(f"{src}: not an uncompressed tar ({err}); extract compressed archives first") from err
    found: list[tuple[str, str, tarfile.TarInfo]] = []
    rejected: list[str] = []
    with tar:
        for member in tar:
            segments = [s for s in member.name.split("/") if s not in ("", ".")]
            if not member.isfile() or not segments or not segments[-1].lower().endswith(IMG_EXTENSIONS):
                continue
            text, _ = printable(member.name)
            if not security.is_inside(member.name):
                rejected.append(text)
            elif len(segments) >= 3 and all(printable(s)[1] for s in segments[-3:-1]):
                found.append((segments[-3], segments[-2], member))
            elif len(segments) >= 3:
                rejected.append(text)
    if rejected:
        logger.warning("%s: %d members rejected (path escapes or name not UTF-8): %s", src, len(rejected), rejected[:5])
    return found, rejected


def scan_tar(src: str) -> Scan:
    """Classes, items and rejected members of an uncompressed tar of an ImageFolder tree ([prefix/]<split>/<class>/
    <image>); see the module docstring."""
    members, rejected = _tar_members(src)
    hidden = sorted({f"{s}/{c}" for s, c, _ in members if s.startswith(".") or c.startswith(".")})
    if hidden:
        logger.warning("%s: hidden folders ignored: %s", src, ", ".join(hidden[:10]))
    members = [(s, c, m) for s, c, m in members if not (s.startswith(".") or c.startswith("."))]
    if not members:
        raise ValueError(f"{src}: no images found; expected [prefix/]<split>/<class>/<image> members")
    class_dirs: dict[str, list[str]] = {}
    for split, cls, _ in members:
        class_dirs.setdefault(split, []).append(cls)
    classes = _classes(class_dirs, {(s, c) for s, c, _ in members}, src)
    index = {c: i for i, c in enumerate(classes)}
    items: dict[str, list[Item]] = {}
    tar_path = os.path.abspath(src)
    for split, cls, m in members:
        key, ok = printable("/".join([s for s in m.name.split("/") if s not in ("", ".")][-3:]))
        item: Item = (
            TarItem(key=key, label=index[cls], tar_path=tar_path, offset=m.offset_data, size=m.size)
            if ok
            else UnreadableItem(key=key, label=index[cls], reason=NOT_UTF8)
        )
        items.setdefault(split, []).append(item)
    return Scan(classes, items, rejected)


def ingest_folder(src: str, output: str, cfg: DataConfig) -> Manifest:
    """ImageFolder tree or uncompressed .tar of one -> shards + manifest at `output` (folder or s3:// URI)."""
    scan = (scan_tar if src.endswith(".tar") else scan_image_folder)(src)
    dataset = printable(os.path.basename(os.path.normpath(src)))[0]
    return ingest(scan.items, scan.classes, output, cfg, dataset=dataset, rejected=scan.rejected)


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
        cfg = DataConfig(**{"shard_size_mb": recipes.FASHION_MNIST_SHARD_MB, **overrides})
        return fashion_mnist.prepare(args.output or recipes.FASHION_MNIST_SHARDS, cfg, args.limit_per_split)
    if not args.output:
        parser.error("--output is required with --src")
    return ingest_folder(args.src, args.output, DataConfig(**overrides))


__all__ = [
    "SCHEMA",
    "ArrayItem",
    "FileItem",
    "Scan",
    "TarItem",
    "UnreadableItem",
    "build_shard",
    "ingest",
    "ingest_folder",
    "main",
    "plan_shards",
    "printable",
    "scan_image_folder",
    "scan_tar",
    "to_rgb_jpeg",
]
