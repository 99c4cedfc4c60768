"""Checkpoint integrity: a manifest written last, verification, and repair of a run folder before resuming.

Every checkpoint folder carries `manifest.json` = {"format": 1, "files": {name: {"size", "sha256"}}}, written after
all other files. A folder without a valid manifest, or whose files differ from it in size (shallow check) or sha256
(deep check), does not exist for resume, finetune, registry or pull: `verify_checkpoint` raises `CheckpointError`
naming the file. Works on local folders and s3:// URIs (pyarrow filesystems from `storage.filesystem_for`).

`repair_run(run_uri)` runs before Ray starts: it verifies the run's checkpoints newest first, moves the ones that fail
to `<run>/corrupt-<name>` (kept for inspection, never deleted) and rewrites Ray Train's run snapshot
(`checkpoint_manager_snapshot.json`) so that it references only checkpoints that exist and verify; Ray then resumes from
the newest verified checkpoint instead of failing on a truncated file or on a dangling snapshot entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from arm_platform import storage

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train V2's run snapshot (ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)."""
QUARANTINE_PREFIX = "corrupt-"
CHECKPOINT_DIR = re.compile(r"^checkpoint_(?P<step>\d{9})(?:-r(?P<retry>\d+))?$")
_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint that is incomplete or altered; the message names the checkpoint and the file."""


def checkpoint_dir_name(step: int, retry: int = 0) -> str:
    """Folder name of the checkpoint after `step` optimizer steps (a retry suffix when that name is taken)."""
    return f"checkpoint_{step:09d}" + (f"-r{retry}" if retry else "")


def checkpoint_step(name: str) -> int | None:
    """Step of a checkpoint folder name, None for other names."""
    match = CHECKPOINT_DIR.match(name)
    return int(match["step"]) if match else None


# ------------------------------------------------------------------------------------------------ manifest
def write_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Hash every file of a local checkpoint folder and write `manifest.json` last (temp name + rename)."""
    folder = Path(directory)
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST_FILE and not path.name.endswith(".tmp"):
            files[path.name] = {"size": path.stat().st_size, "sha256": storage.sha256(str(path))}
    manifest = {"format": 1, "files": files}
    tmp = folder / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST_FILE)
    return manifest


def _fs_join(path: str, name: str) -> str:
    return f"{path.rstrip('/')}/{name}"


def read_manifest(uri: str) -> dict[str, Any]:
    """The parsed manifest of checkpoint `uri`; CheckpointError when it is absent or malformed."""
    fs, path = storage.filesystem_for(uri)
    manifest_path = _fs_join(path, MANIFEST_FILE)
    try:
        with fs.open_input_stream(manifest_path) as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {uri} has no {MANIFEST_FILE}: it was not completely written (or predates manifests)"
        ) from None
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
            isinstance(m, dict) and isinstance(m.get("size"), int) and isinstance(m.get("sha256"), str)
            for m in files.values()
        ):
            raise TypeError("'files' must map names to {size, sha256}")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{storage.join(uri, MANIFEST_FILE)} is malformed: {err!r}") from err
    return manifest


def verify_checkpoint(uri: str, *, deep: bool = True) -> dict[str, Any]:
    """Check every file of checkpoint `uri` against its manifest; returns the manifest.

    Args:
        uri: local folder or s3:// URI of one checkpoint.
        deep: also compare sha256 (reads every byte); False compares sizes only (one listing).
    Raises:
        CheckpointError: naming the missing, truncated or altered file.
    """
    manifest = read_manifest(uri)
    fs, path = storage.filesystem_for(uri)
    for name, meta in manifest["files"].items():
        file_path = _fs_join(path, name)
        info = fs.get_file_info(file_path)
        if info.type != pafs.FileType.File:
            raise CheckpointError(f"{storage.join(uri, name)} is missing (listed in {MANIFEST_FILE})")
        if info.size != meta["size"]:
            raise CheckpointError(
                f"{storage.join(uri, name)} has {info.size} bytes, {MANIFEST_FILE} says {meta['size']} (truncated or "
                "altered)"
            )
        if deep and storage.sha256(storage.join(uri, name)) != meta["sha256"]:
            raise CheckpointError(f"{storage.join(uri, name)} does not match its sha256 in {MANIFEST_FILE}")
    return manifest


# ------------------------------------------------------------------------------------------------ run folders
@dataclass(frozen=True, slots=True)
class Found:
    """One checkpoint folder of a run."""

    name: str
    uri: str

    @property
    def order(self) -> tuple[int, int]:
        match = CHECKPOINT_DIR.match(self.name)
        assert match is not None
        return int(match["step"]), int(match["retry"] or 0)


def list_checkpoints(run_uri: str) -> list[Found]:
    """Checkpoint folders of a run, oldest first (by step, then retry suffix); [] when the run folder is absent."""
    fs, path = storage.filesystem_for(run_uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [
        Found(info.base_name, storage.join(run_uri, info.base_name))
        for info in infos
        if info.type == pafs.FileType.Directory and CHECKPOINT_DIR.match(info.base_name)
    ]
    return sorted(found, key=lambda f: f.order)


def newest_verified(run_uri: str, *, skip: tuple[str, ...] = ()) -> tuple[Found | None, list[tuple[str, str]]]:
    """(newest checkpoint that deep-verifies, [(name, reason) of newer ones that do not]); `skip` names are ignored."""
    rejected = []
    for found in reversed(list_checkpoints(run_uri)):
        if found.name in skip:
            continue
        try:
            verify_checkpoint(found.uri, deep=True)
        except CheckpointError as err:
            rejected.append((found.name, str(err)))
            continue
        return found, rejected
    return None, rejected


def free_checkpoint_name(run_uri: str, step: int) -> str:
    """`checkpoint_<step>` unless a folder of that name exists (a rejected checkpoint): then the next retry name.

    A fresh name keeps Ray's pruning of the old entry from deleting the new checkpoint at the same path.
    """
    fs, path = storage.filesystem_for(run_uri)
    retry = 0
    while fs.get_file_info(_fs_join(path, checkpoint_dir_name(step, retry))).type != pafs.FileType.NotFound:
        retry += 1
    return checkpoint_dir_name(step, retry)


def fetch_verified(checkpoint_uri: str, filename: str, manifest: dict[str, Any], dst: Path) -> Path:
    """Stream one file of a checkpoint into folder `dst`, checking its sha256 against `manifest` on the way."""
    uri = storage.join(checkpoint_uri, filename)
    expected = manifest["files"].get(filename)
    if expected is None:
        raise ValueError(f"checkpoint {checkpoint_uri} has no {filename} (its {MANIFEST_FILE} does not list it)")
    fs, fs_path = storage.filesystem_for(uri)
    digest, path = hashlib.sha256(), dst / filename
    with fs.open_input_stream(fs_path) as src, path.open("wb") as out:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != expected["sha256"]:
        raise CheckpointError(f"{uri} does not match its sha256 in {MANIFEST_FILE}")
    return path


def download(uri: str, local_dir: str | os.PathLike) -> None:
    """Copy a checkpoint folder (local or s3://) into an existing local folder."""
    fs, path = storage.filesystem_for(uri)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def _move_dir(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Move a folder (local rename; on S3 copy every object, then delete the source)."""
    if isinstance(fs, pafs.LocalFileSystem):
        os.replace(src, dst)
        return
    for info in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        if info.type == pafs.FileType.File:
            fs.copy_file(info.path, dst + info.path[len(src) :])
    fs.delete_dir(src)


def repair_run(run_uri: str) -> list[tuple[str, str]]:
    """Quarantine checkpoints newer than the newest verified one and drop them from Ray's run snapshot.

    Older checkpoints get the cheap size check only; one failing it is quarantined too. Returns [(name, reason)] of
    every quarantined checkpoint (empty for a healthy or new run) and logs each with its reason.
    """
    checkpoints = list_checkpoints(run_uri)
    if not checkpoints:
        return []
    good, rejected = newest_verified(run_uri)
    older = [c for c in checkpoints if good is not None and c.order < good.order]
    for found in older:
        try:
            verify_checkpoint(found.uri, deep=False)
        except CheckpointError as err:
            rejected.append((found.name, str(err)))
    if not rejected:
        return []
    fs, path = storage.filesystem_for(run_uri)
    for name, reason in rejected:
        target = f"{QUARANTINE_PREFIX}{name}"
        retry = 0
        while fs.get_file_info(_fs_join(path, target)).type != pafs.FileType.NotFound:
            retry += 1
            target = f"{QUARANTINE_PREFIX}{name}.{retry}"
        _move_dir(fs, _fs_join(path, name), _fs_join(path, target))
        log.warning("skipping checkpoint %s: %s (moved to %s)", name, reason, target)
    _drop_from_ray_snapshot(run_uri, {name for name, _ in rejected})
    log.warning(
        "run %s resumes from %s", run_uri, good.name if good is not None else "scratch (no checkpoint verifies)"
    )
    return rejected


def _drop_from_ray_snapshot(run_uri: str, names: set[str]) -> None:
    """Remove checkpoints from Ray Train's snapshot; the latest becomes the remaining one reported last."""
    uri = storage.join(run_uri, RAY_SNAPSHOT_FILE)
    if not storage.exists(uri):
        return
    snap = json.loads(storage.read_bytes(uri))
    for results, paired in (
        ("checkpoint_results", "checkpoint_report_indices"),
        ("pending_training_results", "pending_validation_specs"),
    ):
        kept = [
            (result, other)
            for result, other in zip(snap[results], snap[paired], strict=True)
            if result["checkpoint_dir_name"] not in names
        ]
        snap[results], snap[paired] = [r for r, _ in kept], [o for _, o in kept]
    for key in (
        "validated_checkpoint_dir_names",
        "timed_out_validation_checkpoint_dir_names",
        "failed_validation_checkpoint_dir_names",
    ):
        snap[key] = [name for name in snap.get(key, []) if name not in names]
    latest = snap.get("latest_checkpoint_result")
    if latest is not None and latest["checkpoint_dir_name"] in names:
        reported = list(zip(snap["checkpoint_results"], snap["checkpoint_report_indices"], strict=True))
        snap["latest_checkpoint_result"] = max(reported, key=lambda pair: pair[1])[0] if reported else None
    storage.write_bytes_atomic(uri, json.dumps(snap).encode())
