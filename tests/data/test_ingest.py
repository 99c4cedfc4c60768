"""Ingest: ImageFolder tree / tar / Fashion-MNIST -> Parquet shards + manifest; resumable, atomic, checksummed."""

import dataclasses
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from arm_platform import storage
from arm_platform.config import DataConfig
from arm_platform.data import check_data_path, fashion_mnist, ingest, read_manifest

SMALL = DataConfig(shard_size_mb=0.2, num_parallel=2)
"""Tiny shards so a few hundred images make several per split; two processes as on CI."""


def _all_files(root: str) -> list[str]:
    return sorted(os.path.relpath(p, root) for p in storage.list_files(root))


def _mtimes(root: str) -> dict[str, int]:
    return {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in _all_files(root)}


@pytest.fixture(scope="module")
def ingested(image_folder, tmp_path_factory):
    """(src, counts, output folder, manifest) of the generated tree ingested once."""
    src, counts = image_folder
    out = str(tmp_path_factory.mktemp("shards"))
    return src, counts, out, ingest.ingest_folder(src, out, SMALL)


def test_manifest_counts_classes_and_skipped(ingested, folder_spec):
    """Every readable image is in a shard; the planted unreadable files are skipped and counted, .txt ignored."""
    _, counts, out, manifest = ingested
    assert manifest.classes == folder_spec["classes"] and manifest.num_classes == 3
    assert manifest.counts == counts
    assert manifest.skipped == {"train": 2, "val": 0}
    keys = [k for s in manifest.shards["train"] for k in s.skipped_keys]
    assert sorted(keys) == sorted(folder_spec["unreadable"])
    assert len(manifest.shards["train"]) > 1 and len(manifest.shards["val"]) >= 1
    assert read_manifest(out).to_json() == manifest.to_json()


def test_shards_match_manifest_checksums_and_schema(ingested):
    """Each shard's sha256 / rows / bytes match the manifest; rows are RGB JPEGs labelled by their class folder."""
    _, _, out, manifest = ingested
    for split in ("train", "val"):
        for shard in manifest.shards[split]:
            data = open(os.path.join(out, shard.path), "rb").read()
            assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.bytes
            table = pq.read_table(io.BytesIO(data))
            image_chunk = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0).column(0)
            assert image_chunk.path_in_schema == "image" and image_chunk.compression == "UNCOMPRESSED"
            assert not image_chunk.has_dictionary_page  # plain JPEG blobs: dictionary pages made reads ~7x slower
            assert table.column_names == ["image", "label", "class_name", "key"] and table.num_rows == shard.rows
            for row in table.slice(0, 5).to_pylist():
                assert row["key"].split("/")[:2] == [split, row["class_name"]]
                assert manifest.classes[row["label"]] == row["class_name"]
                img = Image.open(io.BytesIO(row["image"]))
                assert img.format == "JPEG" and img.mode == "RGB"


def test_shards_mix_classes(ingested):
    """Ingest shuffles before sharding, so a shard holds several classes (Ray Data reads shards in order)."""
    _, _, out, manifest = ingested
    labels = pq.read_table(os.path.join(out, manifest.shards["train"][0].path), columns=["label"])["label"]
    assert len(set(labels.to_pylist())) == 3


def test_rerun_rewrites_nothing_and_leaves_no_temp_files(ingested):
    """Resumable: a second run reuses every shard (mtimes unchanged); atomic writes leave no temp files."""
    src, _, out, manifest = ingested
    before = _mtimes(out)
    again = ingest.ingest_folder(src, out, SMALL)
    after = _mtimes(out)
    shard_files = [p for p in before if p.endswith(".parquet")]
    assert shard_files and all(before[p] == after[p] for p in shard_files)
    assert again.shards == manifest.shards
    assert not [p for p in after if os.path.basename(p).startswith(".tmp-")]


def test_rerun_rewrites_only_missing_or_damaged_shards(image_folder, tmp_path):
    """A deleted shard and a shard with flipped bytes are rewritten; the others keep their mtimes."""
    src, _ = image_folder
    out = str(tmp_path)
    manifest = ingest.ingest_folder(src, out, SMALL)
    shards = [os.path.join(out, s.path) for s in manifest.shards["train"]]
    os.remove(shards[0])
    with open(shards[1], "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    before = _mtimes(out)
    again = ingest.ingest_folder(src, out, SMALL)
    after = _mtimes(out)
    rewritten = {p for p in after if p.endswith(".parquet") and before.get(p) != after[p]}
    assert rewritten == {os.path.relpath(shards[0], out), os.path.relpath(shards[1], out)}
    assert again.shards == manifest.shards


def test_changed_plan_is_not_reused(image_folder, tmp_path):
    """A different shard size changes the plan hash, so shards are rebuilt instead of trusted."""
    src, counts = image_folder
    ingest.ingest_folder(src, str(tmp_path), SMALL)
    bigger = ingest.ingest_folder(src, str(tmp_path), dataclasses.replace(SMALL, shard_size_mb=100))
    assert [len(v) for v in bigger.shards.values()] == [1, 1] and bigger.counts == counts


def test_tar_source_gives_the_same_images(image_folder, ingested, tmp_path):
    """An uncompressed tar of the tree (with a top-level folder) ingests to the same keys and labels."""
    src, counts, _, from_folder = ingested
    tar_path = str(tmp_path / "imagenet.tar")
    with tarfile.open(tar_path, "w") as tar:
        tar.add(src, arcname="imagenet")
    manifest = ingest.ingest_folder(tar_path, str(tmp_path / "out"), SMALL)
    assert manifest.counts == counts and manifest.skipped == from_folder.skipped

    def rows(m, root):
        uris = [os.path.join(root, s.path) for s in m.shards["val"]]
        return sorted(
            (r["key"], r["label"]) for u in uris for r in pq.read_table(u, columns=["key", "label"]).to_pylist()
        )

    assert rows(manifest, str(tmp_path / "out")) == rows(from_folder, ingested[2])


def test_plan_shards_is_deterministic_and_sized():
    items = [ingest.ArrayItem(key=f"k{i}", label=0, pixels=bytes(1000), shape=(1000,)) for i in range(100)]
    a = ingest.plan_shards(items, shard_size_mb=10_000 / 2**20, seed=0)
    b = ingest.plan_shards(list(reversed(items)), shard_size_mb=10_000 / 2**20, seed=0)
    assert [[i.key for i in s] for s in a] == [[i.key for i in s] for s in b]
    assert [len(s) for s in a] == [10] * 10
    assert [i.key for i in a[0]] != [f"k{i}" for i in range(10)]  # shuffled
    with pytest.raises(ValueError, match="shard_size_mb"):
        ingest.plan_shards(items, 0, 0)


def test_check_data_path_names_a_missing_shard(ingested, tmp_path):
    """A shard listed in the manifest but gone: FileNotFoundError naming its URI, after the bounded retries."""
    _, _, out, manifest = ingested
    copy = tmp_path / "copy"
    for rel in _all_files(out):
        os.makedirs(copy / os.path.dirname(rel), exist_ok=True)
        (copy / rel).write_bytes(open(os.path.join(out, rel), "rb").read())
    cfg = DataConfig(data_path=str(copy), io_retries=2)
    assert check_data_path(cfg).counts == manifest.counts
    missing = copy / manifest.shards["val"][0].path
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        check_data_path(cfg)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        check_data_path(DataConfig(data_path=str(tmp_path / "nowhere"), io_retries=1))


def test_cli_writes_shards(image_folder, tmp_path):
    """`jobs/prepare_data.py --src ... --output ... --shard-size-mb ...` writes the manifest."""
    src, counts = image_folder
    manifest = ingest.main(["--src", src, "--output", str(tmp_path), "--shard-size-mb", "1", "--num-parallel", "1"])
    assert manifest.counts == counts
    assert json.loads((tmp_path / "manifest.json").read_text())["counts"] == counts


@pytest.mark.skipif(fashion_mnist.find_root() is None, reason="apt-get install dataset-fashion-mnist (CI installs it)")
def test_fashion_mnist_real_images_round_trip(tmp_path):
    """Real Fashion-MNIST subset: 10 classes, labels from the idx files, 28x28 RGB JPEGs close to the original."""
    images, labels = fashion_mnist.load_split("val", limit=300)
    assert images.shape == (300, 28, 28) and 0 <= labels.min() and labels.max() == 9
    manifest = fashion_mnist.prepare(str(tmp_path), DataConfig(num_parallel=1), limit_per_split=300)
    assert manifest.counts == {"train": 300, "val": 300} and manifest.classes[9] == "Ankle boot"
    table = pq.read_table(os.path.join(tmp_path, manifest.shards["val"][0].path))
    for row in table.slice(0, 20).to_pylist():
        index = int(row["key"].split("/")[1])
        assert row["label"] == labels[index]
        img = np.asarray(Image.open(io.BytesIO(row["image"])))
        assert img.shape == (28, 28, 3)
        assert np.abs(img.astype(int) - images[index][..., None]).mean() < 4  # JPEG q95 of the real photo
