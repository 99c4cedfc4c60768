"""Ray Data pipeline end to end on a local 2-CPU Ray: local and S3 (moto) shards, labels kept with their pixels,
corrupt records dropped and counted. One Ray cluster for the module; few, small datasets."""

import dataclasses
import io
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from arm_platform.config import DataConfig
from arm_platform.data import ingest
from arm_platform.data.manifest import Manifest, ShardInfo, write_manifest
from arm_platform.data.transforms import IMAGENET_MEAN, IMAGENET_STD

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SIZE = 32


def _cfg(data_path: str, **kw) -> DataConfig:
    return DataConfig(
        data_path=data_path, input_size=SIZE, eval_resize=37, decode_cpus=0.25, decode_batch_size=64, **kw
    )


def _drain(ds, batch_size: int = 50, drop_last: bool = False):
    from arm_platform.data import datasets

    it = datasets.iter_batches(ds, batch_size, "cpu", drop_last=drop_last)
    batches = list(it)
    return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches]), it


def _dominant_class(images: torch.Tensor, classes: list[str]) -> list[str]:
    """Class of each normalised image from its strongest mean channel (red / green / blue test images)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (images * std + mean).mean(dim=(2, 3))
    channel = {0: "red", 1: "green", 2: "blue"}
    return [channel[int(i)] for i in rgb.argmax(dim=1)]


@pytest.fixture(scope="module")
def local_shards(image_folder, tmp_path_factory):
    src, counts = image_folder
    out = str(tmp_path_factory.mktemp("pipeline_shards"))
    return out, counts, ingest.ingest_folder(src, out, DataConfig(shard_size_mb=0.2, num_parallel=2))


def test_local_pretrain_datasets_keep_labels_with_pixels(ray_cluster, local_shards):
    """train / val / probe: counts, shapes, normalised floats, and every label matches its image's colour."""
    from arm_platform.data import datasets

    out, counts, manifest = local_shards
    dss = datasets.build_datasets(_cfg(out, max_val_samples=40), "pretrain")
    assert set(dss) == {"train", "val", "probe"}
    images, labels, it = _drain(dss["train"])
    assert images.shape == (counts["train"], 3, SIZE, SIZE) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and it.num_corrupt == 0
    assert -2.2 < images.min() < -1.5 and 2.0 < images.max() < 2.7  # ImageNet-normalised 0..255
    assert _dominant_class(images, manifest.classes) == [manifest.classes[i] for i in labels]
    assert np.bincount(labels.numpy()).tolist() == [counts["train"] // 3] * 3
    val_images, val_labels, _ = _drain(dss["val"])
    assert len(val_labels) == 40 and _dominant_class(val_images, manifest.classes) == [
        manifest.classes[i] for i in val_labels
    ]
    _, probe_labels, _ = _drain(dss["probe"])
    assert len(probe_labels) == 40


def test_train_repeats_probe_split_and_the_finetune_probe_set(ray_cluster, local_shards):
    """train_repeats=3: every train image three times per epoch; probe_split: that split whole, not a train prefix;
    finetune with probe=True (head_init="probe"): the train images with the eval transform."""
    from arm_platform.data import datasets

    out, counts, _ = local_shards
    dss = datasets.build_datasets(_cfg(out, train_repeats=3, probe_split="val"), "pretrain")
    _, labels, _ = _drain(dss["train"])
    assert len(labels) == 3 * counts["train"]
    assert np.bincount(labels.numpy()).tolist() == [counts["train"]] * 3  # each of 3 classes, 3 passes
    _, probe_labels, _ = _drain(dss["probe"])
    assert len(probe_labels) == counts["val"]
    fine = datasets.build_datasets(_cfg(out, max_train_samples=30), "finetune", probe=True)
    assert set(fine) == {"train", "val", "probe"}
    probe_images, probe_labels, _ = _drain(fine["probe"])
    assert len(probe_labels) == 30 and probe_images.shape[1:] == (3, SIZE, SIZE)
    assert set(datasets.build_datasets(_cfg(out), "finetune")) == {"train", "val"}


def test_shards_are_read_in_decode_sized_blocks(ray_cluster, local_shards):
    """Each shard's rows are cut into ~decode_batch_size blocks (one decode task each), not Ray's tiny default ones."""
    from arm_platform.data import datasets

    out, counts, manifest = local_shards
    uris = manifest.shard_uris("train")
    cfg = dataclasses.replace(_cfg(out), decode_batch_size=40)
    blocks = datasets.read_shards(uris, counts["train"], cfg).materialize().num_blocks()
    assert len(uris) < math.ceil(counts["train"] / 40) <= blocks <= 2 * math.ceil(counts["train"] / 40)
    limited = datasets.read_shards(uris, counts["train"], cfg, limit=50)
    assert limited.count() == 50


def test_s3_round_trip_through_ray_data(ray_cluster, s3_bucket, image_folder):
    """Ingest to s3:// on moto, stream back with Ray Data (pyarrow S3FileSystem, endpoint from the env)."""
    from arm_platform.data import datasets

    src, counts = image_folder
    out = f"s3://{s3_bucket}/pipeline"
    manifest = ingest.ingest_folder(src, out, DataConfig(shard_size_mb=0.5, num_parallel=2))
    dss = datasets.build_datasets(_cfg(out, max_train_samples=100), "finetune")
    assert set(dss) == {"train", "val"}
    images, labels, _ = _drain(dss["train"], batch_size=32, drop_last=True)
    assert images.shape == (96, 3, SIZE, SIZE)
    assert _dominant_class(images, manifest.classes) == [manifest.classes[i] for i in labels]
    val_images, val_labels, _ = _drain(dss["val"])
    assert len(val_labels) == counts["val"] and sorted(set(val_labels.tolist())) == [0, 1, 2]


def test_corrupt_record_in_a_shard_is_dropped_and_counted(ray_cluster, tmp_path, image_folder):
    """A shard holding one undecodable JPEG: the batch loses that row and num_corrupt counts it."""
    from arm_platform.data import datasets

    src, _ = image_folder
    goods = sorted(os.listdir(os.path.join(src, "val", "red")))[:9]
    images = [open(os.path.join(src, "val", "red", g), "rb").read() for g in goods]
    images = [ingest.to_rgb_jpeg(b, 95) for b in images]
    images.insert(4, images[0][:150] + b"\x00" * 50)  # truncated JPEG: header fine, data gone
    table = pa.table(
        {"image": images, "label": [2] * 10, "class_name": ["red"] * 10, "key": [f"val/red/{i}" for i in range(10)]},
        schema=ingest.SCHEMA,
    )
    os.makedirs(tmp_path / "val")
    pq.write_table(table, tmp_path / "val" / "part-00000.parquet")
    buf = io.BytesIO()
    pq.write_table(table, buf)
    info = ShardInfo(path="val/part-00000.parquet", rows=10, bytes=len(buf.getvalue()), sha256="")
    write_manifest(
        Manifest(root=str(tmp_path), classes=["blue", "green", "red"], shards={"train": [info], "val": [info]})
    )
    dss = datasets.build_datasets(_cfg(str(tmp_path)), "finetune")
    _, labels, it = _drain(dss["val"], batch_size=10)
    assert labels.tolist() == [2] * 9 and it.num_corrupt == 1
