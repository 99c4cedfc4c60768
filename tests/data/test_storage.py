"""storage.py: URI helpers, atomic local writes, and S3 via a moto server on loopback (endpoint from the env)."""

import os

import pyarrow.fs as pafs
import pytest

from arm_platform import storage
from arm_platform.config import DataConfig
from arm_platform.data import check_data_path, ingest


def test_join_and_split_s3():
    assert storage.join("s3://b/prefix/", "train", "/part-0.parquet") == "s3://b/prefix/train/part-0.parquet"
    assert storage.join("/tmp/x", "manifest.json") == "/tmp/x/manifest.json"
    assert storage.split_s3("s3://bucket/a/b") == ("bucket", "a/b")
    with pytest.raises(ValueError, match="s3://"):
        storage.split_s3("/local/path")


def test_local_write_is_atomic_and_readable(tmp_path):
    """The file appears complete with normal permissions; a failed write leaves neither the file nor a temp."""
    uri = str(tmp_path / "sub" / "blob.bin")
    storage.write_bytes_atomic(uri, b"abc" * 1000)
    assert storage.read_bytes(uri) == b"abc" * 1000 and storage.exists(uri)
    assert os.stat(uri).st_mode & 0o044  # readable by group/others as with open(), not mkstemp's 0600
    with pytest.raises(TypeError):
        storage.write_bytes_atomic(str(tmp_path / "sub" / "never.bin"), object())  # type: ignore[arg-type]
    assert sorted(os.listdir(tmp_path / "sub")) == ["blob.bin"]
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        storage.read_bytes(str(tmp_path / "nothing.bin"))


def test_filesystem_for_local_path(tmp_path):
    fs, path = storage.filesystem_for(str(tmp_path))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)


@pytest.mark.slow
def test_s3_round_trip_and_errors(s3_bucket):
    """Put / get / head / list against moto; a missing key raises FileNotFoundError naming the URI."""
    uri = f"s3://{s3_bucket}/t/blob.bin"
    storage.write_bytes_atomic(uri, b"payload")
    assert storage.read_bytes(uri) == b"payload" and storage.exists(uri)
    assert not storage.exists(f"s3://{s3_bucket}/t/other.bin")
    assert f"s3://{s3_bucket}/t/blob.bin" in set(storage.list_files(f"s3://{s3_bucket}/t"))
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/t/missing.bin"):
        storage.read_bytes(f"s3://{s3_bucket}/t/missing.bin")
    fs, path = storage.filesystem_for(uri)
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{s3_bucket}/t/blob.bin"
    with fs.open_input_stream(path) as f:  # pyarrow reaches the same endpoint (what Ray Data uses)
        assert f.read() == b"payload"


@pytest.mark.slow
def test_unreachable_endpoint_is_a_clear_error(s3_bucket, monkeypatch):
    """A closed port: ConnectionError naming the endpoint and the URI, after bounded retries."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    cfg = DataConfig(data_path=f"s3://{s3_bucket}/gone", io_retries=2)
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:9.*s3://arm-data/gone/manifest.json"):
        check_data_path(cfg)


@pytest.mark.slow
def test_ingest_to_s3_resumes_without_rewriting(image_folder, s3_bucket):
    """Shards + manifest land in the bucket; a second run keeps every object's ETag and LastModified; a deleted
    shard makes check_data_path fail naming its s3:// URI."""
    src, counts = image_folder
    out = f"s3://{s3_bucket}/ingest"
    cfg = DataConfig(shard_size_mb=0.5, num_parallel=2)
    manifest = ingest.ingest_folder(src, out, cfg)
    assert manifest.counts == counts and manifest.skipped["train"] == 2

    def objects():
        pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="ingest/")
        return {o["Key"]: (o["ETag"], o["LastModified"]) for p in pages for o in p.get("Contents", [])}

    before = objects()
    assert "ingest/manifest.json" in before and any(k.endswith(".parquet") for k in before)
    ingest.ingest_folder(src, out, cfg)
    after = objects()
    assert {k: v for k, v in after.items() if k.endswith(".parquet")} == {
        k: v for k, v in before.items() if k.endswith(".parquet")
    }
    check = DataConfig(data_path=out, io_retries=2)
    assert check_data_path(check).counts == counts
    gone = manifest.shard_uris("train")[0]
    storage.s3_client().delete_object(Bucket=s3_bucket, Key=storage.split_s3(gone)[1])
    with pytest.raises(FileNotFoundError, match=gone):
        check_data_path(check)
