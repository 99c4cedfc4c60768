"""Bad and hostile ingest input: tar / ImageFolder traversal, undecodable names, symlink loops, empty classes, and
the pre-flight check of shards (changed bytes, truncation, footer) and manifests (garbled, incomplete)."""

import io
import json
import logging
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from arm_platform import storage
from arm_platform.config import DataConfig
from arm_platform.data import check_data_path, ingest, read_manifest

ONE = DataConfig(num_parallel=1)


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _tree(root, layout: dict[str, dict[str, int]]) -> str:
    """Write <root>/<split>/<class>/<i>.jpg for {split: {class: count}}; returns root."""
    for split, classes in layout.items():
        for cls, n in classes.items():
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for i in range(n):
                with open(os.path.join(root, split, cls, f"{i}.jpg"), "wb") as f:
                    f.write(_jpeg(40 * i))
    return str(root)


def _hostile_tar(path) -> str:
    """ds/{train,val}/a/*.jpg plus members that escape, with '..' as split or class, or an absolute path."""
    members = {
        "ds/train/a/ok.jpg": 1,
        "ds/val/a/ok.jpg": 1,
        "ds/../a/evil-split.jpg": 1,
        "ds/train/../evil-class.jpg": 1,
        "ds/train/a/../../../../../evil-deep.jpg": 1,
        "/abs/train/a/evil-abs.jpg": 1,
    }
    with tarfile.open(path, "w") as tar:
        for name in members:
            data = _jpeg(100)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _files_below(root) -> set[str]:
    return {os.path.relpath(os.path.join(r, n), root) for r, _, names in os.walk(root) for n in names}


# --------------------------------------------------------------------------------------------------------------------
# scan


def test_tar_members_that_escape_are_rejected_and_never_written(tmp_path):
    """Local output: only ds/{train,val}/a/ok.jpg are ingested; the 4 hostile members are counted and listed, and
    nothing lands outside --output (no split named '..', no shard next to the output folder)."""
    tar_path = _hostile_tar(tmp_path / "hostile.tar")
    out = tmp_path / "deep" / "out"
    manifest = ingest.ingest_folder(tar_path, str(out), ONE)
    assert sorted(manifest.shards) == ["train", "val"] and manifest.counts == {"train": 1, "val": 1}
    assert manifest.rejected == 4 and all("evil" in k for k in manifest.rejected_keys)
    assert _files_below(tmp_path) - {"hostile.tar"} == {f"deep/out/{p}" for p in _files_below(out)}
    assert read_manifest(str(out)).rejected == 4


@pytest.mark.slow
def test_tar_members_that_escape_never_reach_s3(tmp_path, s3_bucket):
    """S3 output: no key outside the prefix, no '..' segment in any key, no '..' split in the manifest."""

    def keys() -> set[str]:
        pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
        return {o["Key"] for p in pages for o in p.get("Contents", [])}

    out = f"s3://{s3_bucket}/hostile"
    before = keys()  # the session's bucket holds other tests' objects
    manifest = ingest.ingest_folder(_hostile_tar(tmp_path / "hostile.tar"), out, ONE)
    assert sorted(manifest.shards) == ["train", "val"] and manifest.rejected == 4
    written = keys() - before
    assert written and all(k.startswith("hostile/") and ".." not in k.split("/") for k in written)
    assert check_data_path(DataConfig(data_path=out, io_retries=1)).counts == {"train": 1, "val": 1}


def test_unreadable_names_and_symlink_loops_are_skipped_counted_and_listed(tmp_path):
    """A non-UTF-8 file name, a symlink loop and a dangling link: the ingest finishes; each is skipped, counted and
    listed in skipped_keys (printable), like an undecodable image."""
    src = _tree(tmp_path / "src", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    folder = os.path.join(src, "train", "a")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as f:
        f.write(_jpeg(10))
    os.symlink("loop2.jpg", os.path.join(folder, "loop1.jpg"))
    os.symlink("loop1.jpg", os.path.join(folder, "loop2.jpg"))
    os.symlink("gone.jpg", os.path.join(src, "val", "b", "dangling.jpg"))
    manifest = ingest.ingest_folder(src, str(tmp_path / "out"), ONE)
    assert manifest.counts == {"train": 4, "val": 2} and manifest.skipped == {"train": 3, "val": 1}
    keys = sorted(k for shards in manifest.shards.values() for s in shards for k in s.skipped_keys)
    assert keys == ["train/a/caf\\xe9.jpg", "train/a/loop1.jpg", "train/a/loop2.jpg", "val/b/dangling.jpg"]
    json.loads((tmp_path / "out" / "manifest.json").read_text())  # valid JSON, valid UTF-8


def test_empty_class_folders_stay_in_classes_with_a_warning(tmp_path, caplog):
    """train/b is empty: classes stay [a, b, c] (c keeps label 2, as in a copy where b has images); a warning
    names the folder. Hidden folders are ignored and non-UTF-8 class folders rejected."""
    src = _tree(tmp_path / "src", {"train": {"a": 1, "c": 1, ".ipynb_checkpoints": 1}, "val": {"a": 1, "c": 1}})
    os.makedirs(os.path.join(src, "train", "b"))
    os.makedirs(os.path.join(os.fsencode(src), b"train", b"\xff\xfe"))
    with caplog.at_level(logging.WARNING, logger="arm_platform.data.ingest"):
        manifest = ingest.ingest_folder(src, str(tmp_path / "out"), ONE)
    assert manifest.classes == ["a", "b", "c"] and manifest.counts == {"train": 2, "val": 2}
    assert manifest.rejected == 1 and manifest.rejected_keys == ["train/\\xff\\xfe"]
    assert "train/b" in caplog.text and ".ipynb_checkpoints" in caplog.text
    rows = pq.read_table(tmp_path / "out" / manifest.shards["val"][0].path).to_pylist()
    assert sorted((r["class_name"], r["label"]) for r in rows) == [("a", 0), ("c", 2)]


# --------------------------------------------------------------------------------------------------------------------
# pre-flight check of shards and manifests


@pytest.fixture
def shards(tmp_path):
    """(data path, first train shard path) of a tiny local ingest."""
    out = str(tmp_path / "out")
    src = _tree(tmp_path / "src", {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}})
    manifest = ingest.ingest_folder(src, out, ONE)
    return out, os.path.join(out, manifest.shards["train"][0].path)


def _flip_byte(path: str, offset: int = 200) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_changed_shard_bytes_are_caught_by_the_checksum(shards):
    """Same size, same footer, one byte changed: the sha256 check names the shard (on by default for small sets);
    with verify_checksums=False only the cheap checks run and pass."""
    out, shard = shards
    _flip_byte(shard)
    with pytest.raises(ValueError, match=f"shard {shard} has sha256"):
        check_data_path(DataConfig(data_path=out, io_retries=1))
    check_data_path(DataConfig(data_path=out, io_retries=1, verify_checksums=False))


def test_truncated_shard_fails_the_cheap_check_naming_it(shards):
    out, shard = shards
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(ValueError, match=f"shard {shard} is {size - 10} bytes but manifest.json records {size}"):
        check_data_path(DataConfig(data_path=out, io_retries=1, verify_checksums=False))


def test_missing_parquet_footer_fails_without_a_recorded_size(shards):
    """A manifest without sizes (hand-written): the footer check still catches a file that is not whole Parquet."""
    out, shard = shards
    body = json.loads(open(os.path.join(out, "manifest.json")).read())
    for entry in body["shards"]["train"]:
        del entry["bytes"], entry["sha256"]
    storage.write_bytes_atomic(os.path.join(out, "manifest.json"), json.dumps(body).encode())
    _flip_byte(shard, os.path.getsize(shard) - 1)
    with pytest.raises(ValueError, match=f"shard {shard} does not end in a Parquet footer"):
        check_data_path(DataConfig(data_path=out, io_retries=1))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda b: b"{not json", "is not valid JSON"),
        (lambda b: json.dumps({**b, "shards": None}).encode(), "field 'shards' must be dict"),
        (lambda b: json.dumps({k: v for k, v in b.items() if k != "shards"}).encode(), "missing field 'shards'"),
        (lambda b: json.dumps({k: v for k, v in b.items() if k != "classes"}).encode(), "missing field 'classes'"),
        (lambda b: json.dumps(_edit_shard(b, "rows", None)).encode(), r"shards.train\[0\]: missing field 'rows'"),
        (lambda b: json.dumps(_edit_shard(b, "path", "../x.parquet")).encode(), "'../x.parquet' is outside"),
        (lambda b: b"\xff\xfe", "is not valid JSON"),
    ],
)
def test_garbled_or_incomplete_manifest_names_the_file_and_field(shards, edit, message):
    out, _ = shards
    uri = os.path.join(out, "manifest.json")
    body = json.loads(open(uri).read())
    storage.write_bytes_atomic(uri, edit(body))
    with pytest.raises(ValueError, match=message) as err:
        check_data_path(DataConfig(data_path=out, io_retries=1))
    assert uri in str(err.value)


def _edit_shard(body: dict, key: str, value) -> dict:
    entry = body["shards"]["train"][0]
    if value is None:
        del entry[key]
    else:
        entry[key] = value
    return body


@pytest.mark.slow
def test_s3_shard_changed_or_truncated_is_named(tmp_path, s3_bucket):
    """On S3 (moto) the same checks run with one ranged GET per shard (and a streamed sha256)."""
    out = f"s3://{s3_bucket}/verify"
    src = _tree(tmp_path / "src", {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}})
    manifest = ingest.ingest_folder(src, out, ONE)
    cfg = DataConfig(data_path=out, io_retries=1)
    assert check_data_path(cfg).counts == {"train": 6, "val": 2}
    uri = manifest.shard_uris("train")[0]
    data = bytearray(storage.read_bytes(uri))
    data[200] ^= 0xFF
    storage.write_bytes_atomic(uri, bytes(data))
    with pytest.raises(ValueError, match=f"shard {uri} has sha256"):
        check_data_path(cfg)
    storage.write_bytes_atomic(uri, bytes(data[:-10]))
    with pytest.raises(ValueError, match=f"shard {uri} is {len(data) - 10} bytes"):
        check_data_path(DataConfig(data_path=out, io_retries=1, verify_checksums=False))
    storage.write_bytes_atomic(uri, b"")  # an empty object has no suffix range: still a clear size error
    with pytest.raises(ValueError, match=f"shard {uri} is 0 bytes"):
        check_data_path(DataConfig(data_path=out, io_retries=1, verify_checksums=False))
