"""Fashion-MNIST (Zalando, MIT): 70,000 real 28x28 grayscale product photos in 10 classes, shipped by Debian's
``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``), so demos train on real images with no
download. Converted to RGB JPEG shards at their native 28x28; the pipeline upscales to the model's input size.
"""

from __future__ import annotations

import dataclasses
import gzip
import os

import numpy as np

from arm_platform import recipes
from arm_platform.config import DataConfig
from arm_platform.data.manifest import Manifest
from arm_platform.data.shards import ArrayItem, Item, ingest

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SPLITS = {"train": "train", "val": "t10k"}
"""Our split name -> the idx file prefix."""
FEW_LABEL_SPLITS = ("labelled", "heldout")
"""Few-label protocol (the demo): "labelled" = the first `few_labels` train images (the only labels a finetune or
linear probe sees), "heldout" = the last `few_labels` train images (hyperparameter selection). Both are also in
"train", which pretraining reads without labels; "val" (the 10,000 test images) is scored once per arm."""
_IDX_HEADER = {"images": 16, "labels": 8}


def find_root() -> str | None:
    """Folder holding the idx files ($FASHION_MNIST_DIR or the Debian package's), or None when not installed."""
    for root in (os.environ.get("FASHION_MNIST_DIR"), DEFAULT_ROOT):
        if root and os.path.exists(os.path.join(root, "train-labels-idx1-ubyte.gz")):
            return root
    return None


def load_split(split: str, root: str | None = None, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of "train" (60k) or "val" (10k), the first `limit` if given."""
    if split not in SPLITS:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; valid: {', '.join(SPLITS)}")
    root = root or find_root()
    if root is None:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {DEFAULT_ROOT}: apt-get install dataset-fashion-mnist "
            "(or set FASHION_MNIST_DIR to a folder with the *-idx*-ubyte.gz files)"
        )
    with gzip.open(os.path.join(root, f"{SPLITS[split]}-labels-idx1-ubyte.gz"), "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=_IDX_HEADER["labels"]).astype(np.int64)
    with gzip.open(os.path.join(root, f"{SPLITS[split]}-images-idx3-ubyte.gz"), "rb") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=_IDX_HEADER["images"]).reshape(len(labels), 28, 28)
    n = len(labels) if limit is None else min(limit, len(labels))
    return images[:n], labels[:n]


def items(
    root: str | None = None, limit_per_split: int | None = None, few_labels: int = recipes.DEMO_LABELS
) -> dict[str, list[Item]]:
    """{split: ArrayItem per image}, keys "<idx split>/<index:05d>" (the image's index in its idx file).

    Adds the `FEW_LABEL_SPLITS` when the train split holds at least 2 * few_labels images.
    """
    out: dict[str, list[Item]] = {}
    for split in SPLITS:
        images, labels = load_split(split, root, limit_per_split)
        out[split] = [
            ArrayItem(key=f"{split}/{i:05d}", label=int(y), pixels=x.tobytes(), shape=x.shape)
            for i, (x, y) in enumerate(zip(images, labels, strict=True))
        ]
    train = out["train"]
    if few_labels > 0 and len(train) >= 2 * few_labels:
        out["labelled"], out["heldout"] = train[:few_labels], train[-few_labels:]
    return out


def prepare(
    output: str = recipes.FASHION_MNIST_SHARDS,
    cfg: DataConfig | None = None,
    limit_per_split: int | None = None,
    root: str | None = None,
    few_labels: int = recipes.DEMO_LABELS,
) -> Manifest:
    """Write Fashion-MNIST as RGB JPEG shards + manifest at `output` (folder or s3:// URI).

    Splits: train (60,000), val (the 10,000 test images) and, with the full train split, the few-label splits
    "labelled" / "heldout" (`FEW_LABEL_SPLITS`, `few_labels` images each; 0 leaves them out). Without a `cfg`,
    shards of `recipes.FASHION_MNIST_SHARD_MB`.
    """
    cfg = cfg or dataclasses.replace(DataConfig(), shard_size_mb=recipes.FASHION_MNIST_SHARD_MB)
    return ingest(items(root, limit_per_split, few_labels), CLASSES, output, cfg, dataset="fashion-mnist")
